"""The emulated account's state: pools, nodes, jobs and tasks with their legal transitions.

Each entity keeps what the client sent (``spec``, the create body in the wire's camelCase)
beside what the service computes (state, times, counters), and renders itself to the wire
form with :meth:`to_wire`. State changes go through :func:`_move`, which refuses a
transition Batch never makes, so a scheduling bug shows up as an error instead of a task
that silently jumps from ``active`` to ``completed`` with a start time.

All mutation happens under :attr:`Account.lock`; the HTTP handlers and the executor thread
share one :class:`Account`.

A job keeps its tasks twice: in ``Job.tasks`` (by id, in submission order) and in its
:class:`TaskIndex`, which every state change updates, so that what a client asks of a job
with 100,000 tasks costs what the answer holds rather than the whole job: task counts are
counters, a listing filtered on state and ``stateTransitionTime`` reads a time-ordered
index, an add-collection checks ids in a set, and the scheduler takes the oldest active
tasks from a heap.
"""

from __future__ import annotations

import bisect
import copy
import datetime as _dt
import hashlib
import heapq
import itertools
import secrets
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import batch_error
from .wire import UNLIMITED, format_duration, format_time, new_etag, parse_duration, utcnow

__all__ = [
    "Account",
    "IllegalTransition",
    "Job",
    "ManagedIdentity",
    "Node",
    "Pool",
    "Task",
    "TaskIndex",
]

JSON = dict[str, Any]

#: Metric samples an autoscale pool keeps (a day of them, one every 30 seconds).
SAMPLE_HISTORY = 2880

TASK_TRANSITIONS: dict[str, frozenset[str]] = {
    "active": frozenset({"preparing", "running", "completed"}),
    "preparing": frozenset({"running", "active", "completed"}),
    "running": frozenset({"completed", "active"}),
    "completed": frozenset({"active"}),
}
JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    "active": frozenset({"terminating", "completed", "disabling", "deleting"}),
    "disabling": frozenset({"disabled", "deleting", "terminating"}),
    "disabled": frozenset({"enabling", "deleting", "terminating"}),
    "enabling": frozenset({"active", "deleting", "terminating"}),
    "terminating": frozenset({"completed", "deleting"}),
    "completed": frozenset({"deleting"}),
    "deleting": frozenset(),
}
NODE_TRANSITIONS: dict[str, frozenset[str]] = {
    "creating": frozenset({"starting", "leavingpool", "preempted", "unusable"}),
    "starting": frozenset(
        {"waitingforstarttask", "idle", "offline", "leavingpool", "preempted", "unusable"}
    ),
    "waitingforstarttask": frozenset(
        {"idle", "offline", "starttaskfailed", "leavingpool", "preempted", "unusable"}
    ),
    "starttaskfailed": frozenset({"leavingpool", "starting", "preempted", "unusable", "rebooting"}),
    "idle": frozenset({"running", "offline", "leavingpool", "preempted", "unusable", "rebooting"}),
    "running": frozenset({"idle", "offline", "leavingpool", "preempted", "unusable", "rebooting"}),
    # Scheduling disabled (DisableNodeScheduling) and no task running.
    "offline": frozenset({"idle", "leavingpool", "preempted", "unusable", "rebooting"}),
    "rebooting": frozenset({"starting", "leavingpool", "unusable"}),
    "preempted": frozenset({"starting", "leavingpool"}),
    "unusable": frozenset({"starting", "leavingpool"}),
    "leavingpool": frozenset(),
}
POOL_TRANSITIONS: dict[str, frozenset[str]] = {
    "active": frozenset({"deleting"}),
    "deleting": frozenset(),
}
ALLOCATION_TRANSITIONS: dict[str, frozenset[str]] = {
    "steady": frozenset({"resizing"}),
    "resizing": frozenset({"steady", "stopping"}),
    "stopping": frozenset({"steady"}),
}


class IllegalTransition(RuntimeError):
    """The emulator tried a state change Batch never makes (an emulator bug)."""


def _move(kind: str, table: dict[str, frozenset[str]], current: str, new: str, ident: str) -> None:
    if new != current and new not in table.get(current, frozenset()):
        raise IllegalTransition(f"{kind} {ident!r} cannot go from {current!r} to {new!r}")


@dataclass
class _Stamped:
    """Shared bookkeeping: ETag, times and the previous state."""

    id: str
    state: str
    creation_time: _dt.datetime = field(default_factory=utcnow)
    last_modified: _dt.datetime = field(default_factory=utcnow)
    state_transition_time: _dt.datetime = field(default_factory=utcnow)
    previous_state: str | None = None
    previous_state_transition_time: _dt.datetime | None = None
    etag: str = field(default_factory=new_etag)

    def touch(self) -> None:
        """Record a modification: new ETag and lastModified."""
        self.etag = new_etag()
        self.last_modified = utcnow()

    def _set_state(self, new: str) -> None:
        if new == self.state:
            return
        now = utcnow()
        self.previous_state = self.state
        self.previous_state_transition_time = self.state_transition_time
        self.state = new
        self.state_transition_time = now


@dataclass(frozen=True)
class ManagedIdentity:
    """A user-assigned managed identity, as ``az identity create`` makes one: its ARM
    resource id names it to Batch, its client id and principal id to Entra ID."""

    resource_id: str
    client_id: str
    principal_id: str

    def to_wire(self) -> JSON:
        """As a pool lists it (``BatchUserAssignedIdentity``)."""
        return {
            "resourceId": self.resource_id,
            "clientId": self.client_id,
            "principalId": self.principal_id,
        }


@dataclass
class StartTaskInfo:
    """What the node's start task did; rendered as ``startTaskInfo``."""

    state: str = "running"
    start_time: _dt.datetime = field(default_factory=utcnow)
    end_time: _dt.datetime | None = None
    exit_code: int | None = None
    retry_count: int = 0
    last_retry_time: _dt.datetime | None = None
    failure: JSON | None = None

    def to_wire(self) -> JSON:
        out: JSON = {"state": self.state, "startTime": format_time(self.start_time)}
        if self.end_time is not None:
            out["endTime"] = format_time(self.end_time)
        if self.exit_code is not None:
            out["exitCode"] = self.exit_code
        if self.failure is not None:
            out["failureInfo"] = copy.deepcopy(self.failure)
        out["retryCount"] = self.retry_count
        if self.last_retry_time is not None:
            out["lastRetryTime"] = format_time(self.last_retry_time)
        if self.state == "completed":
            out["result"] = "failure" if self.failure or self.exit_code else "success"
        return out


@dataclass
class Node:
    """One compute node: its slots, the tasks on it, and its directory on the local disk."""

    id: str
    pool_id: str
    is_dedicated: bool
    state: str
    root: Path
    ip_address: str
    state_transition_time: _dt.datetime = field(default_factory=utcnow)
    allocation_time: _dt.datetime = field(default_factory=utcnow)
    last_boot_time: _dt.datetime | None = None
    running: dict[tuple[str, str], int] = field(default_factory=dict)
    total_tasks_run: int = 0
    total_tasks_succeeded: int = 0
    start_task_info: StartTaskInfo | None = None
    #: ``errors``: what keeps the node from running tasks, when Batch knows (an image its
    #: pool prefetches that could not be pulled).
    errors: list[JSON] = field(default_factory=list)
    generation: int = 0
    #: Leaving the pool once its running tasks end (``taskcompletion`` / ``retaineddata``
    #: deallocation): no new task is placed on it meanwhile.
    draining: bool = False
    #: Names this node in the path of its metadata endpoint (its IMDS), which the node's
    #: processes alone are told: a local process cannot be told apart by its address.
    metadata_token: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    #: ``schedulingState``: False after DisableNodeScheduling, until EnableNodeScheduling.
    #: It outlasts a reboot, as on Batch.
    scheduling_enabled: bool = True

    def move(self, new: str) -> None:
        """Change state if Batch allows that change.

        A node whose scheduling is disabled is ``offline`` where it would be ``idle``.
        """
        if new == "idle" and not self.scheduling_enabled:
            new = "offline"
        _move("node", NODE_TRANSITIONS, self.state, new, self.id)
        if new != self.state:
            self.state = new
            self.state_transition_time = utcnow()
            if new == "starting":
                self.last_boot_time = self.state_transition_time
                self.generation += 1

    @property
    def used_slots(self) -> int:
        """Slots taken by the tasks running on this node."""
        return sum(self.running.values())

    @property
    def schedulable(self) -> bool:
        """Whether the scheduler may place tasks on this node now."""
        return self.state in ("idle", "running") and not self.draining and self.scheduling_enabled

    def to_wire(self, base_url: str, pool: Pool) -> JSON:
        out: JSON = {
            "id": self.id,
            "url": f"{base_url}/pools/{self.pool_id}/nodes/{self.id}",
            "state": self.state,
            "schedulingState": "enabled" if self.scheduling_enabled else "disabled",
            "stateTransitionTime": format_time(self.state_transition_time),
        }
        if self.last_boot_time is not None:
            out["lastBootTime"] = format_time(self.last_boot_time)
        out.update(
            {
                "allocationTime": format_time(self.allocation_time),
                "ipAddress": self.ip_address,
                "affinityId": f"TVM:{self.id}",
                "vmSize": pool.spec.get("vmSize", ""),
                "totalTasksRun": self.total_tasks_run,
                "totalTasksSucceeded": self.total_tasks_succeeded,
                "runningTasksCount": len(self.running),
                "runningTaskSlotsCount": self.used_slots,
                "isDedicated": self.is_dedicated,
            }
        )
        out["endpointConfiguration"] = {"inboundEndpoints": pool.inbound_endpoints(self)}
        if self.running:
            out["recentTasks"] = [
                {
                    "taskUrl": f"{base_url}/jobs/{job_id}/tasks/{task_id}",
                    "jobId": job_id,
                    "taskId": task_id,
                    "taskState": "running",
                }
                for job_id, task_id in self.running
            ]
        if "startTask" in pool.spec:
            out["startTask"] = pool.wire_start_task()
        if self.start_task_info is not None:
            out["startTaskInfo"] = self.start_task_info.to_wire()
        if self.errors:
            out["errors"] = copy.deepcopy(self.errors)
        out["nodeAgentInfo"] = {
            "version": "1.12.0.0",
            "lastUpdateTime": format_time(self.allocation_time),
        }
        vmc = pool.spec.get("virtualMachineConfiguration", {})
        image = dict(vmc.get("imageReference", {}))
        if image:
            image.setdefault("version", "latest")
            image.setdefault("exactVersion", image["version"])
            out["virtualMachineInfo"] = {"imageReference": image}
        return out


@dataclass
class Pool(_Stamped):
    """A pool: what was asked for (``spec``), its nodes and its allocation state."""

    spec: JSON = field(default_factory=dict)
    allocation_state: str = "steady"
    allocation_state_transition_time: _dt.datetime = field(default_factory=utcnow)
    nodes: dict[str, Node] = field(default_factory=dict)
    node_counter: int = 0
    #: The last evaluation of the autoscale formula, as ``autoScaleRun`` on the wire.
    autoscale_run: JSON | None = None
    #: When (``time.monotonic``) EnableAutoScale last succeeded: the service takes one such
    #: call per pool every 30 seconds.
    autoscale_enabled_at: float | None = None
    #: Bumped whenever the evaluation schedule restarts or stops, so that stale timers do
    #: nothing.
    autoscale_epoch: int = 0
    #: ``(time, {metric: value})`` samples for the autoscale formula, oldest first.
    samples: deque[tuple[float, Mapping[str, float]]] = field(
        default_factory=lambda: deque(maxlen=SAMPLE_HISTORY)
    )
    #: User-assigned managed identities, given through the management plane only (the
    #: data plane's pool creation has no ``identity``); read back as ``identity``.
    identities: list[ManagedIdentity] = field(default_factory=list)
    _ranks: tuple[tuple[int, int], dict[str, int]] | None = field(
        default=None, repr=False, compare=False
    )

    def identity(self, resource_id: str) -> ManagedIdentity | None:
        """The pool's identity with this ARM resource id (compared case-insensitively)."""
        wanted = resource_id.lower()
        return next((i for i in self.identities if i.resource_id.lower() == wanted), None)

    def move(self, new: str) -> None:
        """Change the pool state if Batch allows it."""
        _move("pool", POOL_TRANSITIONS, self.state, new, self.id)
        self._set_state(new)

    def move_allocation(self, new: str) -> None:
        """Change the allocation state if Batch allows it."""
        _move("pool allocation", ALLOCATION_TRANSITIONS, self.allocation_state, new, self.id)
        if new != self.allocation_state:
            self.allocation_state = new
            self.allocation_state_transition_time = utcnow()

    @property
    def slots_per_node(self) -> int:
        """``taskSlotsPerNode``, 1 when not given."""
        return int(self.spec.get("taskSlotsPerNode", 1) or 1)

    @property
    def target_dedicated(self) -> int:
        """``targetDedicatedNodes``."""
        return int(self.spec.get("targetDedicatedNodes", 0) or 0)

    @property
    def target_spot(self) -> int:
        """``targetLowPriorityNodes``."""
        return int(self.spec.get("targetLowPriorityNodes", 0) or 0)

    def live_nodes(self, *, dedicated: bool) -> list[Node]:
        """Nodes that count towards the current node count (not leaving the pool)."""
        return [
            n
            for n in self.nodes.values()
            if n.is_dedicated == dedicated and n.state != "leavingpool"
        ]

    def node_rank(self, node_id: str) -> int:
        """The node's position among the pool's node ids in sorted order (0 if not a node).

        Sorted once per membership: listing 1,000 nodes must not sort them 1,000 times.
        Nodes are only added (which bumps ``node_counter``) or removed (which shrinks the
        dict), so ``(len(nodes), node_counter)`` never comes back to an earlier value.
        """
        key = (len(self.nodes), self.node_counter)
        if self._ranks is None or self._ranks[0] != key:
            self._ranks = (key, {nid: i for i, nid in enumerate(sorted(self.nodes))})
        return self._ranks[1].get(node_id, 0)

    def inbound_endpoints(self, node: Node) -> list[JSON]:
        """The node's public endpoints: the pool's inbound NAT pools, else the default SSH rule."""
        index = self.node_rank(node.id)
        nat = (
            self.spec.get("networkConfiguration", {})
            .get("endpointConfiguration", {})
            .get("inboundNATPools", [])
        )
        rules = [
            (str(p.get("name", "rule")), str(p.get("protocol", "tcp")).lower(),
             int(p.get("frontendPortRangeStart", 50000)), int(p.get("backendPort", 22)))
            for p in nat
        ] or [("SSHRule", "tcp", 50000, 22)]  # fmt: skip
        return [
            {
                "name": f"{name}.{index}",
                "protocol": protocol,
                "publicIPAddress": "127.0.0.1",
                "publicFQDN": "localhost",
                "frontendPort": start + index,
                "backendPort": backend,
            }
            for name, protocol, start, backend in rules
        ]

    def wire_start_task(self) -> JSON:
        """The pool's start task with the defaults the service fills in."""
        st: JSON = copy.deepcopy(self.spec["startTask"])
        st.setdefault("userIdentity", {"autoUser": {"scope": "pool", "elevationLevel": "nonadmin"}})
        st.setdefault("maxTaskRetryCount", 0)
        st.setdefault("waitForSuccess", True)
        return st

    def to_wire(self, base_url: str) -> JSON:
        s = self.spec
        out: JSON = {
            "id": self.id,
            "url": f"{base_url}/pools/{self.id}",
            "eTag": self.etag,
            "lastModified": format_time(self.last_modified),
            "creationTime": format_time(self.creation_time),
            "state": self.state,
            "stateTransitionTime": format_time(self.state_transition_time),
            "allocationState": self.allocation_state,
            "allocationStateTransitionTime": format_time(self.allocation_state_transition_time),
            "vmSize": s.get("vmSize", ""),
            "resizeTimeout": _wire_duration(s.get("resizeTimeout"), "PT15M"),
            "currentDedicatedNodes": len(self.live_nodes(dedicated=True)),
            "targetDedicatedNodes": self.target_dedicated,
            "currentLowPriorityNodes": len(self.live_nodes(dedicated=False)),
            "targetLowPriorityNodes": self.target_spot,
            "enableAutoScale": bool(s.get("enableAutoScale", False)),
            "enableInterNodeCommunication": bool(s.get("enableInterNodeCommunication", False)),
            "taskSlotsPerNode": self.slots_per_node,
            "taskSchedulingPolicy": {
                "nodeFillType": _title(
                    s.get("taskSchedulingPolicy", {}).get("nodeFillType", "spread")
                ),
                "jobDefaultOrder": s.get("taskSchedulingPolicy", {}).get("jobDefaultOrder", "none"),
            },
        }
        if "displayName" in s:
            out["displayName"] = s["displayName"]
        vmc = copy.deepcopy(s.get("virtualMachineConfiguration"))
        if vmc is not None:
            if "imageReference" in vmc:
                vmc["imageReference"].setdefault("version", "latest")
            out["virtualMachineConfiguration"] = vmc
        for key in (
            "networkConfiguration",
            "applicationPackageReferences",
            "userAccounts",
            "metadata",
            "mountConfiguration",
            "upgradePolicy",
        ):
            if key in s:
                out[key] = copy.deepcopy(s[key])
        # The service sends these only while the pool scales automatically.
        if s.get("enableAutoScale"):
            for key in ("autoScaleFormula", "autoScaleEvaluationInterval"):
                if key in s:
                    out[key] = s[key]
            if self.autoscale_run is not None:
                out["autoScaleRun"] = copy.deepcopy(self.autoscale_run)
        if "startTask" in s:
            out["startTask"] = self.wire_start_task()
        if self.identities:
            out["identity"] = {
                "type": "UserAssigned",
                "userAssignedIdentities": [i.to_wire() for i in self.identities],
            }
        return out


def _title(value: str) -> str:
    return value[:1].upper() + value[1:]


def _wire_duration(text: object, default: str) -> str:
    """A duration as the service writes it back: ``PT10M`` for the ``PT10M00S`` the CLI sends.

    The service keeps a duration as a time span, not as the text it was given; a text the
    request check let through but that does not parse is written back as it came.
    """
    if not isinstance(text, str) or not text:
        return default
    try:
        return format_duration(parse_duration(text))
    except ValueError:
        return text


@dataclass
class Job(_Stamped):
    """A job: its spec, the tasks in submission order, and how it ended."""

    spec: JSON = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    end_time: _dt.datetime | None = None
    terminate_reason: str | None = None
    #: The id of the pool made from ``poolInfo.autoPoolSpecification``, if any.
    auto_pool_id: str | None = None
    #: The tasks by state, by time and by age (see :class:`TaskIndex`).
    index: TaskIndex = field(default_factory=lambda: TaskIndex(), repr=False, compare=False)

    def move(self, new: str) -> None:
        """Change the job state if Batch allows it."""
        _move("job", JOB_TRANSITIONS, self.state, new, self.id)
        self._set_state(new)

    def add_task(self, task: Task) -> None:
        """Add ``task`` (a new id) to the job and its index."""
        self.tasks[task.id] = task
        self.index.add(task)

    def remove_task(self, task: Task) -> None:
        """Take ``task`` out of the job and its index (DeleteTask)."""
        if self.tasks.get(task.id) is task:
            del self.tasks[task.id]
            self.index.remove(task)

    def has_task_id(self, task_id: str) -> bool:
        """Whether a task of this id exists; ids are case-insensitive, as on Batch."""
        return self.index.has_id(task_id)

    @property
    def pool_id(self) -> str | None:
        """The pool the job's tasks run on."""
        pid = self.spec.get("poolInfo", {}).get("poolId") or self.auto_pool_id
        return str(pid) if pid else None

    @property
    def priority(self) -> int:
        """Job priority; higher runs first."""
        return int(self.spec.get("priority", 0) or 0)

    @property
    def max_task_retry_count(self) -> int:
        """The job's default ``maxTaskRetryCount`` for its tasks."""
        return int(self.spec.get("constraints", {}).get("maxTaskRetryCount", 0) or 0)

    def to_wire(self, base_url: str) -> JSON:
        s = self.spec
        constraints = {
            "maxWallClockTime": _wire_duration(
                s.get("constraints", {}).get("maxWallClockTime"), UNLIMITED
            ),
            "maxTaskRetryCount": self.max_task_retry_count,
        }
        out: JSON = {
            "id": self.id,
            "url": f"{base_url}/jobs/{self.id}",
            "eTag": self.etag,
            "lastModified": format_time(self.last_modified),
            "creationTime": format_time(self.creation_time),
            "state": self.state,
            "stateTransitionTime": format_time(self.state_transition_time),
        }
        if self.previous_state is not None and self.previous_state_transition_time:
            out["previousState"] = self.previous_state
            out["previousStateTransitionTime"] = format_time(self.previous_state_transition_time)
        if "displayName" in s:
            out["displayName"] = s["displayName"]
        out.update(
            {
                "priority": self.priority,
                "maxParallelTasks": int(s.get("maxParallelTasks", -1)),
                "usesTaskDependencies": bool(s.get("usesTaskDependencies", False)),
                "allowTaskPreemption": bool(s.get("allowTaskPreemption", False)),
                "constraints": constraints,
            }
        )
        for key in (
            "jobManagerTask",
            "jobPreparationTask",
            "jobReleaseTask",
            "commonEnvironmentSettings",
            "poolInfo",
            "networkConfiguration",
            "metadata",
        ):
            if key in s:
                out[key] = copy.deepcopy(s[key])
        execution: JSON = {"startTime": format_time(self.creation_time)}
        if self.end_time is not None:
            execution["endTime"] = format_time(self.end_time)
        if self.pool_id:
            execution["poolId"] = self.pool_id
        if self.terminate_reason is not None:
            execution["terminateReason"] = self.terminate_reason
        out["executionInfo"] = execution
        out["onAllTasksComplete"] = str(s.get("onAllTasksComplete", "noaction")).lower()
        out["onTaskFailure"] = str(s.get("onTaskFailure", "noaction")).lower()
        return out


@dataclass
class Task(_Stamped):
    """A task: its spec, where and how often it ran, and how its last run ended."""

    job_id: str = ""
    spec: JSON = field(default_factory=dict)
    retry_count: int = 0
    requeue_count: int = 0
    last_retry_time: _dt.datetime | None = None
    last_requeue_time: _dt.datetime | None = None
    start_time: _dt.datetime | None = None
    end_time: _dt.datetime | None = None
    exit_code: int | None = None
    failure: JSON | None = None
    node_id: str | None = None
    pool_id: str | None = None
    task_dir: Path | None = None
    default_retries: int = 0
    #: Bumped on every (re)dispatch so that a stale run cannot finish a newer one.
    attempt: int = 0
    #: Submission order within the job, and the index that tracks the task (set by
    #: :meth:`TaskIndex.add`; None once the task is deleted).
    seq: int = 0
    index: TaskIndex | None = field(default=None, repr=False, compare=False)
    #: Whether the index counted this task's completion as a failure.
    counted_failed: bool = False
    #: Names the task's live entry in the index's queue of active tasks.
    queue_token: int = 0

    def move(self, new: str) -> None:
        """Change the task state if Batch allows it (and tell the job's index)."""
        _move("task", TASK_TRANSITIONS, self.state, new, f"{self.job_id}/{self.id}")
        old = self.state
        self._set_state(new)
        self.touch()
        if self.index is not None and old != new:
            self.index.moved(self, old)

    @property
    def required_slots(self) -> int:
        """``requiredSlots``, 1 when not given."""
        return int(self.spec.get("requiredSlots", 1) or 1)

    @property
    def max_task_retry_count(self) -> int:
        """The task's own ``maxTaskRetryCount``, else the job's; -1 means unlimited."""
        c = self.spec.get("constraints", {})
        if "maxTaskRetryCount" in c and c["maxTaskRetryCount"] is not None:
            return int(c["maxTaskRetryCount"])
        return self.default_retries

    @property
    def max_wall_clock(self) -> _dt.timedelta | None:
        """``maxWallClockTime`` as a timedelta; None when unlimited."""
        text = self.spec.get("constraints", {}).get("maxWallClockTime")
        return parse_duration(text) if text else None

    @property
    def result(self) -> str | None:
        """``success`` or ``failure`` once completed."""
        if self.state != "completed" or (self.exit_code is None and self.failure is None):
            return None
        return "failure" if self.failure is not None else "success"

    def to_wire(self, base_url: str) -> JSON:
        s = self.spec
        url = f"{base_url}/jobs/{self.job_id}/tasks/{self.id}"
        out: JSON = {
            "id": self.id,
            "url": url,
            "eTag": self.etag,
            "creationTime": format_time(self.creation_time),
            "lastModified": format_time(self.last_modified),
            "state": self.state,
            "stateTransitionTime": format_time(self.state_transition_time),
        }
        if self.previous_state is not None and self.previous_state_transition_time:
            out["previousState"] = self.previous_state
            out["previousStateTransitionTime"] = format_time(self.previous_state_transition_time)
        if "displayName" in s:
            out["displayName"] = s["displayName"]
        out["commandLine"] = s.get("commandLine", "")
        for key in (
            "exitConditions",
            "containerSettings",
            "resourceFiles",
            "outputFiles",
            "environmentSettings",
            "affinityInfo",
            "multiInstanceSettings",
            "dependsOn",
            "applicationPackageReferences",
            "authenticationTokenSettings",
        ):
            if key in s:
                out[key] = copy.deepcopy(s[key])
        c = s.get("constraints", {})
        wall = c.get("maxWallClockTime")
        out["constraints"] = {
            "maxWallClockTime": format_duration(parse_duration(wall)) if wall else UNLIMITED,
            "retentionTime": _wire_duration(c.get("retentionTime"), "P7D"),
            "maxTaskRetryCount": self.max_task_retry_count,
        }
        out["requiredSlots"] = self.required_slots
        out["userIdentity"] = copy.deepcopy(
            s.get("userIdentity", {"autoUser": {"scope": "pool", "elevationLevel": "nonadmin"}})
        )
        ex: JSON = {}
        if self.start_time is not None:
            ex["startTime"] = format_time(self.start_time)
        if self.end_time is not None and self.state == "completed":
            ex["endTime"] = format_time(self.end_time)
        if self.exit_code is not None and self.state == "completed":
            ex["exitCode"] = self.exit_code
        if self.failure is not None and self.state == "completed":
            ex["failureInfo"] = copy.deepcopy(self.failure)
        ex["retryCount"] = self.retry_count
        if self.last_retry_time is not None:
            ex["lastRetryTime"] = format_time(self.last_retry_time)
        ex["requeueCount"] = self.requeue_count
        if self.last_requeue_time is not None:
            ex["lastRequeueTime"] = format_time(self.last_requeue_time)
        if self.result is not None:
            ex["result"] = self.result
        out["executionInfo"] = ex
        if self.node_id is not None and self.pool_id is not None:
            node_url = f"{base_url}/pools/{self.pool_id}/nodes/{self.node_id}"
            rel = f"workitems/{self.job_id}/job-1/{self.id}"
            out["nodeInfo"] = {
                "affinityId": f"TVM:{self.node_id}",
                "nodeUrl": node_url,
                "poolId": self.pool_id,
                "nodeId": self.node_id,
                "taskRootDirectory": rel,
                "taskRootDirectoryUrl": f"{node_url}/files/{rel}",
            }
        return out


#: Task states in the order Batch lists them in task counts.
TASK_STATES = ("active", "preparing", "running", "completed")
#: A lower bound on ``stateTransitionTime`` is widened by this much when the index picks
#: candidates, so that rounding in the wire's text form can never drop a task the full
#: filter would keep (the filter is applied to every candidate anyway).
_TIME_SLACK = _dt.timedelta(milliseconds=1)


class TaskIndex:
    """A job's tasks by state, by state-transition time and by submission order.

    It holds, updated on every state change (:meth:`Task.move` calls :meth:`moved`):

    * the tasks in each state (counts and slot counts are the sizes of these sets, and the
      succeeded and failed counts are kept as tasks complete), so task counts cost nothing;
    * a per-state timeline, ``(stateTransitionTime, seq, task)`` in time order, so that
      "completed since T" reads only what completed since T (stale entries of tasks that
      moved on are skipped, and dropped when they outnumber the live ones);
    * the tasks in submission order, for listings without a usable filter, and the
      lower-cased ids, so that an add-collection of 100 tasks checks 100 ids, not 100 x n;
    * a heap of the active tasks by submission order, which the scheduler pops from until
      the pool is full, instead of walking every task of the job on every tick.

    ``examined`` counts the tasks whose wire form a listing built and tested, and
    ``popped`` the active tasks the scheduler took off the queue: what listings and
    scheduling cost, which tests compare with the size of what they produced.
    """

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._tokens = itertools.count(1)
        self._order: list[Task] = []
        self._order_seqs: list[int] = []
        self._removed = 0
        self._ids: set[str] = set()
        self._by_state: dict[str, dict[str, Task]] = {s: {} for s in TASK_STATES}
        self._slots: Counter[str] = Counter()
        self._timeline: dict[str, list[tuple[_dt.datetime, int, Task]]] = {
            s: [] for s in TASK_STATES
        }
        self._queue: list[tuple[int, int, Task]] = []
        self.failed = 0
        self.failed_slots = 0
        self.examined = 0
        self.popped = 0

    # -- membership ---------------------------------------------------------------------

    def add(self, task: Task) -> None:
        """Index a new task (its state as it is now)."""
        task.seq = next(self._seq)
        task.index = self
        self._order.append(task)
        self._order_seqs.append(task.seq)
        self._ids.add(task.id.lower())
        self._enter(task, task.state)

    def remove(self, task: Task) -> None:
        """Forget a deleted task; its entries in the order and timelines go stale."""
        if task.index is not self:
            return
        self._leave(task, task.state)
        self._ids.discard(task.id.lower())
        task.index = None
        self._removed += 1
        if self._removed > 1024 and self._removed * 2 > len(self._order):
            kept = [t for t in self._order if t.index is self]
            self._order = kept
            self._order_seqs = [t.seq for t in kept]
            self._removed = 0

    def has_id(self, task_id: str) -> bool:
        """Whether a task with this id (compared case-insensitively) exists."""
        return task_id.lower() in self._ids

    def moved(self, task: Task, old: str) -> None:
        """Record that ``task`` went from ``old`` to its current state."""
        self._leave(task, old)
        self._enter(task, task.state)

    def _enter(self, task: Task, state: str) -> None:
        self._by_state.setdefault(state, {})[task.id] = task
        self._slots[state] += task.required_slots
        line = self._timeline.setdefault(state, [])
        entry = (task.state_transition_time, task.seq, task)
        if not line or line[-1][:2] <= entry[:2]:
            line.append(entry)  # the usual case: transitions come in time order
        else:
            bisect.insort(line, entry, key=lambda e: e[:2])
        if len(line) > 1024 and len(line) > 2 * len(self._by_state[state]):
            self._compact(state)
        if state == "completed":
            task.counted_failed = task.failure is not None
            if task.counted_failed:
                self.failed += 1
                self.failed_slots += task.required_slots
        elif state == "active":
            task.queue_token = next(self._tokens)
            heapq.heappush(self._queue, (task.seq, task.queue_token, task))

    def _leave(self, task: Task, state: str) -> None:
        if self._by_state.get(state, {}).pop(task.id, None) is None:
            return
        self._slots[state] -= task.required_slots
        if state == "completed" and task.counted_failed:
            self.failed -= 1
            self.failed_slots -= task.required_slots
            task.counted_failed = False

    def _compact(self, state: str) -> None:
        live = self._by_state.get(state, {}).values()
        self._timeline[state] = sorted(
            ((t.state_transition_time, t.seq, t) for t in live), key=lambda e: e[:2]
        )

    # -- counts -------------------------------------------------------------------------

    def count(self, *states: str) -> int:
        """How many tasks are in any of ``states`` now."""
        return sum(len(self._by_state.get(s, {})) for s in states)

    def slots(self, *states: str) -> int:
        """The slots that the tasks in ``states`` need (``requiredSlots`` summed)."""
        return sum(self._slots[s] for s in states)

    def in_state(self, state: str) -> list[Task]:
        """The tasks in ``state`` now (a copy: the caller may change their states)."""
        return list(self._by_state.get(state, {}).values())

    # -- the scheduler's queue ----------------------------------------------------------

    def pop_active(self) -> Iterator[Task]:
        """The active tasks, oldest submission first, each taken off the queue.

        The scheduler gives back with :meth:`put_back` the ones it could not place.
        """
        while self._queue:
            _, token, task = heapq.heappop(self._queue)
            if task.index is self and task.state == "active" and task.queue_token == token:
                self.popped += 1
                yield task

    def put_back(self, tasks: Iterable[Task]) -> None:
        """Queue again active tasks that :meth:`pop_active` gave and were not placed."""
        for task in tasks:
            if task.index is self and task.state == "active":
                heapq.heappush(self._queue, (task.seq, task.queue_token, task))

    # -- listings -----------------------------------------------------------------------

    def candidates(
        self,
        *,
        states: frozenset[str] | None,
        since: _dt.datetime | None,
        after: int,
    ) -> Iterator[Task]:
        """Tasks with ``seq > after`` in submission order, a superset of those in one of
        ``states`` (None: any) whose ``stateTransitionTime`` is at or after ``since``
        (None: any time). The caller applies the full filter to each.

        With a time bound, each state's timeline is read from ``since`` on: the cost is
        that of the tasks that moved since then, not of the job. With states alone, a few
        of them are gathered and sorted; a state that holds most of the job is read in
        submission order instead, checking states as it goes.
        """
        if states is not None:
            states = frozenset(s for s in states if s in self._by_state)
        if states is not None and since is not None:
            low = since - _TIME_SLACK
            found: list[Task] = []
            for state in states:
                line = self._timeline[state]
                start = bisect.bisect_left(line, low, key=lambda e: e[0])
                found.extend(
                    task
                    for when, seq, task in line[start:]
                    if seq > after
                    and task.index is self
                    and task.state == state
                    and task.state_transition_time == when
                )
            found.sort(key=lambda t: t.seq)
            yield from found
            return
        if states is not None:
            size = self.count(*states)
            if size * 8 < len(self._order) - self._removed:
                picked = [t for s in states for t in self._by_state[s].values() if t.seq > after]
                picked.sort(key=lambda t: t.seq)
                yield from picked
                return
        start = bisect.bisect_right(self._order_seqs, after)
        for i in range(start, len(self._order)):
            task = self._order[i]
            if task.index is self and (states is None or task.state in states):
                yield task


class Account:
    """Everything the emulated Batch account holds, behind one lock."""

    def __init__(self, *, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.pools: dict[str, Pool] = {}
        self.jobs: dict[str, Job] = {}
        #: The user-assigned managed identities that exist (resource id, lower case ->
        #: identity): what the management plane lets a pool be given.
        self.identities: dict[str, ManagedIdentity] = {}

    def notify(self) -> None:
        """Wake the executor: something it may act on changed. Call with the lock held."""
        self.changed.notify_all()

    def pool(self, pool_id: str) -> Pool:
        """The pool, or 404 ``PoolNotFound``."""
        try:
            return self.pools[pool_id]
        except KeyError:
            raise batch_error("PoolNotFound") from None

    def job(self, job_id: str) -> Job:
        """The job, or 404 ``JobNotFound``."""
        try:
            return self.jobs[job_id]
        except KeyError:
            raise batch_error("JobNotFound") from None

    def task(self, job_id: str, task_id: str) -> Task:
        """The task, or 404 ``TaskNotFound`` (``JobNotFound`` if the job is missing)."""
        job = self.job(job_id)
        try:
            return job.tasks[task_id]
        except KeyError:
            raise batch_error("TaskNotFound") from None

    def node(self, pool_id: str, node_id: str) -> Node:
        """The node, or 404 ``NodeNotFound``."""
        pool = self.pool(pool_id)
        try:
            return pool.nodes[node_id]
        except KeyError:
            raise batch_error("NodeNotFound") from None

    def node_by_metadata_token(self, token: str) -> tuple[Pool, Node] | None:
        """The pool and node whose metadata endpoint ``token`` names, while it is a node."""
        for pool in self.pools.values():
            for node in pool.nodes.values():
                if secrets.compare_digest(node.metadata_token, token):
                    return pool, node
        return None

    def new_node(self, pool: Pool, *, dedicated: bool, state: str) -> Node:
        """Add a node to ``pool`` with a Batch-like id and its directory tree."""
        pool.node_counter += 1
        digest = hashlib.sha256(f"{pool.id}/{pool.node_counter}".encode()).hexdigest()
        node_id = f"tvmps_{digest}_{'d' if dedicated else 'p'}"
        root = self.root / pool.id / node_id
        for sub in ("shared", "startup", "workitems", "applications", "fsmounts", "volatile"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        node = Node(
            id=node_id,
            pool_id=pool.id,
            is_dedicated=dedicated,
            state=state,
            root=root,
            ip_address=f"10.0.{pool.node_counter // 250}.{pool.node_counter % 250 + 4}",
        )
        pool.nodes[node_id] = node
        return node

"""Running the account: node life cycles, scheduling tasks onto slots, and local processes.

One executor thread owns time: it moves nodes through ``creating → starting →
waitingForStartTask → idle`` (after the configured allocation delay), places active tasks
onto free slots, and enforces wall-clock limits. Each placed task runs in a thread of its
own that stages its files and waits for its process (``/bin/sh -c commandLine`` in a
process group, so that a kill reaches every child). Task and node directories are laid out
as on a Batch node (``{node}/workitems/{job}/job-1/{task}/wd`` with stdout.txt and
stderr.txt beside ``wd``; the start task in ``{node}/startup``), and the process sees the
``AZ_BATCH_*`` variables, the host's pip settings (so that a run reaches the package index
as the host does) and nothing else of the emulator's own environment.

Container images are pulled from the emulator's image table (:mod:`.images`): a node whose
pool prefetches an image the table lacks goes ``unusable`` with a node error, and a task or
start task whose image the table lacks completes with a ``ContainerInvalidImage`` failure,
as on Batch.

With ``execution="simulated"`` nothing runs as a process, so that a pool of 1,000 slots and
100,000 tasks fits on a laptop: a placed task holds its slots for ``task_duration`` seconds
(a timer of the executor thread), a joblib worker task meanwhile runs its calls in one of
``worker_threads`` threads of this process (:mod:`.inprocess`), and the task completes once
both are done, with the exit code the worker returned. Everything else (slots, node and
task states, retries, requeues, wall-clock limits, task counts) is what it is with
processes. Start tasks succeed at once; resource and output files are not transferred; a
task's ``stdout.txt`` and ``stderr.txt`` are written only when it fails.
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import itertools
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import images as _images
from . import imds, inprocess
from .images import BareImage
from .models import Account, Job, Node, Pool, StartTaskInfo, Task
from .staging import StagingError, download_resource_files, upload_output_files
from .tls import TokenRegistry
from .wire import parse_duration, utcnow

__all__ = ["EXECUTION_MODES", "SIMULATED_WORKERS", "Executor"]

#: How tasks run: as local processes, or simulated (timers, and the worker in-process).
EXECUTION_MODES = ("processes", "simulated")
#: What a simulated joblib task runs: the worker inline, the worker's own ``main``, or
#: nothing (the task only takes its duration and writes no result).
SIMULATED_WORKERS = (*inprocess.MODES, "none")

_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Proxy variables a run keeps from the host, with every ``PIP_*`` variable: a node reaches
#: the package index, and here the host's way to reach it is the node's.
_PROXY_VARIABLES = frozenset(
    {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}
    | {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"}
)

_TERMINATED = {
    "category": "usererror",
    "code": "TaskEnded",
    "message": "Task Was Ended by User Request",
    "details": [{"name": "Message", "value": "Task Was Ended by User Request"}],
}
_WALL_CLOCK = {
    "category": "usererror",
    "code": "MaxWallClockTimeExpiry",
    "message": "The task exceeded its maximum wall clock time and was terminated",
    "details": [{"name": "Message", "value": "The task exceeded its maximum wall clock time"}],
}
_EXIT_CODE = {
    "category": "usererror",
    "code": "FailureExitCode",
    "message": "The task process exited with an unexpected exit code",
    "details": [
        {"name": "Message", "value": "The task process exited with an unexpected exit code"}
    ],
}


@dataclass
class _Run:
    """One attempt of a task (or a start task) on a node."""

    key: tuple[str, str]
    attempt: int
    node: Node
    process: subprocess.Popen[bytes] | None = None
    #: Why the emulator stopped it: "requeue", "terminate", "wallclock" or "shutdown".
    stop_reason: str | None = None
    deadline: float | None = None
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    #: Simulated execution: the task, whether its duration is over, whether its in-process
    #: worker call is still to finish, and how that call ended.
    task: Task | None = None
    simulated: bool = False
    elapsed: bool = False
    calling: bool = False
    outcome: inprocess.Outcome | None = None


def host_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """What of the host's environment a run keeps: pip's settings and the proxies.

    A run's ``HOME`` is its working directory, as on a Batch node, so pip there would
    neither read the user's pip configuration (``~/.config/pip/pip.conf``) nor find the
    user's wheel cache. Point ``PIP_CONFIG_FILE`` and ``PIP_CACHE_DIR`` at them (unless the
    host already sets them), so that a start task's ``pip install`` reaches the index the
    host's own installs reach and reuses the wheels they cached.
    """
    out = {k: v for k, v in environ.items() if k.startswith("PIP_") or k in _PROXY_VARIABLES}
    home = environ.get("HOME") or os.path.expanduser("~")
    config_home = environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    if "PIP_CONFIG_FILE" not in out:
        for candidate in (
            os.path.join(config_home, "pip", "pip.conf"),
            os.path.join(home, ".pip", "pip.conf"),
        ):
            if os.path.isfile(candidate):
                out["PIP_CONFIG_FILE"] = candidate
                break
    if "PIP_CACHE_DIR" not in out:
        cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
        out["PIP_CACHE_DIR"] = os.path.join(cache_home, "pip")
    return out


def _user_identity(identity: Mapping[str, Any] | None) -> str:
    """``AZ_BATCH_TASK_USER_IDENTITY`` for a task's ``userIdentity``: the named user, or the
    auto-user's scope and elevation (``PoolNonAdmin`` by default, as on a node)."""
    if identity and identity.get("username"):
        return str(identity["username"])
    auto = (identity or {}).get("autoUser") or {}
    scope = "Task" if str(auto.get("scope", "pool")).lower() == "task" else "Pool"
    admin = str(auto.get("elevationLevel", "nonadmin")).lower() == "admin"
    return f"{scope}{'Admin' if admin else 'NonAdmin'}"


def _exit_status(returncode: int) -> int:
    """A killed process reports 128 + signal, as a shell on the node would."""
    return 128 - returncode if returncode < 0 else returncode


class Executor:
    """Drives node states and task processes for one :class:`Account`."""

    def __init__(
        self,
        account: Account,
        *,
        base_url: Callable[[], str],
        images: Mapping[str, str] | None = None,
        default_python: str | None = None,
        max_processes: int | None = None,
        allocation_delay: float = 0.0,
        deletion_delay: float = 0.2,
        bare: BareImage | None = None,
        tokens: TokenRegistry | None = None,
        execution: str = "processes",
        task_duration: float = 1.0,
        simulated_worker: str = "inline",
        worker_threads: int = 8,
    ) -> None:
        if execution not in EXECUTION_MODES:
            raise ValueError(
                f"execution must be one of {', '.join(EXECUTION_MODES)}, not {execution!r}"
            )
        if simulated_worker not in SIMULATED_WORKERS:
            raise ValueError(
                f"simulated_worker must be one of {', '.join(SIMULATED_WORKERS)}, "
                f"not {simulated_worker!r}"
            )
        if task_duration < 0:
            raise ValueError(f"task_duration must be at least 0, not {task_duration}")
        if worker_threads < 1:
            raise ValueError(f"worker_threads must be at least 1, not {worker_threads}")
        self.account = account
        #: ``simulated``: tasks are timers and the worker runs in this process (module doc).
        self.simulated = execution == "simulated"
        self.task_duration = task_duration
        self.simulated_worker = simulated_worker
        self.worker_threads = worker_threads
        #: Calls of simulated joblib tasks waiting for one of the worker threads; those
        #: threads are daemons, so that a call still retrying its blob requests when the
        #: account stops never holds up the interpreter's exit (a pool's threads would).
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._callers: list[threading.Thread] = []
        #: Mints the tokens of the pools' managed identities (for resource files fetched
        #: as an identity; task processes get theirs from their node's metadata endpoint).
        self.tokens = tokens or TokenRegistry()
        #: Seconds a deleted pool or job stays in ``deleting`` before it is gone, as on Azure
        #: (where it takes seconds), so that clients see and poll the transition.
        self.deletion_delay = deletion_delay
        self._base_url = base_url
        #: The registry: image reference → the interpreter that stands in for the image.
        #: A reference it cannot resolve (:func:`.images.resolve`) fails to pull.
        self.images = dict(images or {})
        self.default_python = default_python or sys.executable
        #: With bare nodes, the ``python:X.Y-slim`` stand-in: every run in it (and every run
        #: outside a container) gets a fresh layer over it, thrown away when the run ends.
        self.bare = bare
        self.host_settings = host_settings(os.environ)
        self._layers = account.root / ".containers"
        self.max_processes = max_processes or max(4, (os.cpu_count() or 2) * 4)
        self.allocation_delay = allocation_delay
        #: The certificate bundle task processes trust (the emulator's own with ``tls=True``):
        #: a real node trusts the public CAs that sign Azure's endpoints, a local node must
        #: trust the self-signed certificate of the local endpoints instead.
        self.ca_bundle: Path | None = None
        self._runs: dict[tuple[str, str], _Run] = {}
        self._start_runs: dict[str, _Run] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._loop, name="batch-emulator-executor", daemon=True
        )

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the executor thread."""
        self._thread.start()
        # Task processes run in sessions of their own, so they would outlive an interpreter
        # that exits without stop() (an uncaught error at exit, a forgotten emulator).
        atexit.register(self._kill_all)

    def _kill_all(self) -> None:
        for run in [*self._runs.values(), *self._start_runs.values()]:
            if run.process is not None and run.process.poll() is None:
                _killpg(run.process)

    def stop(self, *, timeout: float = 10.0) -> None:
        """Kill every process the emulator started and stop the thread."""
        with self.account.lock:
            self._stopping = True
            runs = [*self._runs.values(), *self._start_runs.values()]
            for run in runs:
                self._kill(run, "shutdown")
            self.account.notify()
        self._thread.join(timeout)
        atexit.unregister(self._kill_all)
        # Calls under way end on their own (their blob requests fail once Azurite stops).
        for _ in self._callers:
            self._calls.put(None)
        self._callers = []
        deadline = time.monotonic() + timeout
        for run in runs:
            run.done.wait(max(0.0, deadline - time.monotonic()))
            if run.process is not None and run.process.poll() is None:
                _killpg(run.process)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    run.process.wait(1.0)

    def process_ids(self) -> list[int]:
        """Process ids of the local processes running now (for tests of cleanup)."""
        with self.account.lock:
            return [
                r.process.pid
                for r in (*self._runs.values(), *self._start_runs.values())
                if r.process is not None and r.process.poll() is None
            ]

    def later(self, delay: float, action: Callable[[], None]) -> None:
        """Run ``action`` (under the lock, on the executor thread) after ``delay`` seconds."""
        with self.account.lock:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), action))
            self.account.notify()

    def _loop(self) -> None:
        acc = self.account
        with acc.lock:
            while not self._stopping:
                try:
                    self._fire_timers()
                    self._retire_drained()
                    self._enforce_wall_clock()
                    self._schedule()
                    self._complete_jobs()
                except Exception:  # the executor must outlive an emulator bug in one tick
                    import traceback

                    traceback.print_exc()
                wait = 0.2
                if self._timers:
                    wait = min(wait, max(0.0, self._timers[0][0] - time.monotonic()))
                acc.changed.wait(wait)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, action = heapq.heappop(self._timers)
            action()

    # -- pools and nodes --------------------------------------------------------------------

    def reconcile(self, pool: Pool, *, deallocation: str = "requeue") -> None:
        """Grow or shrink ``pool`` towards its targets (lock held).

        ``deallocation`` is what happens to the tasks of a node that goes (the
        ``nodeDeallocationOption`` of a resize, ``$NodeDeallocationOption`` of an autoscale
        formula): ``requeue`` them, ``terminate`` them, or let them finish first
        (``taskcompletion``, ``retaineddata``): the node then leaves when it is idle, and no
        task is placed on it meanwhile. A node still finishing its tasks is kept, rather
        than a new one created, when the target grows again.
        """
        if pool.state != "active":
            return
        changed = False
        for dedicated, target in ((True, pool.target_dedicated), (False, pool.target_spot)):
            live = [n for n in pool.live_nodes(dedicated=dedicated) if not n.draining]
            draining = [n for n in pool.live_nodes(dedicated=dedicated) if n.draining]
            missing = target - len(live)
            for node in draining[: max(0, missing)]:
                node.draining = False
                missing -= 1
                changed = True
            for _ in range(missing):
                node = self.account.new_node(pool, dedicated=dedicated, state="creating")
                self._boot(pool, node)
                changed = True
            excess = len(live) - target
            if excess > 0:
                victims = sorted(
                    live, key=lambda n: (n.state not in ("idle", "offline"), n.used_slots)
                )
                for node in victims[:excess]:
                    self._deallocate(pool, node, deallocation)
                    changed = True
        if changed:
            pool.move_allocation("resizing")
        self._maybe_steady(pool)

    def _deallocate(self, pool: Pool, node: Node, option: str) -> None:
        """Take ``node`` out of ``pool`` as the deallocation ``option`` says."""
        option = option.lower()
        if option in ("taskcompletion", "retaineddata") and node.running:
            node.draining = True
            return
        if option == "terminate":
            for job_id, task_id in list(node.running):
                job = self.account.jobs.get(job_id)
                task = job.tasks.get(task_id) if job else None
                if task is not None:
                    self.terminate_task(task)
        self.remove_node(pool, node, requeue=True)

    def _retire_drained(self) -> None:
        """Remove the draining nodes whose last task has ended."""
        for pool in list(self.account.pools.values()):
            done = [n for n in pool.nodes.values() if n.draining and not n.running]
            for node in done:
                self.remove_node(pool, node, requeue=True)
            if done:
                self._maybe_steady(pool)
                self.account.notify()

    def _maybe_steady(self, pool: Pool) -> None:
        if pool.allocation_state == "steady":
            return
        settling = {"creating", "starting", "waitingforstarttask"}
        if not any(n.state in settling or n.draining for n in pool.nodes.values()):
            pool.move_allocation("steady")
            pool.touch()

    def _unpullable(self, pool: Pool) -> str | None:
        """The first image the pool prefetches that cannot be pulled, if any."""
        vmc = pool.spec.get("virtualMachineConfiguration") or {}
        names = (vmc.get("containerConfiguration") or {}).get("containerImageNames") or []
        for name in names:
            if _images.resolve(self.images, str(name)) is None:
                return str(name)
        return None

    def _boot(self, pool: Pool, node: Node, *, first_delay: float | None = None) -> None:
        """Take ``node`` through creating/starting to idle (or its start task).

        While starting, the node pulls the images its pool prefetches
        (``containerConfiguration.containerImageNames``); one that cannot be pulled leaves
        the node ``unusable`` with a node error, and Batch does not recover such a node by
        itself (see :func:`.images.node_pull_error`).
        """
        delay = self.allocation_delay
        generation = node.generation

        def to_starting() -> None:
            if node.state in ("creating", "preempted", "unusable", "starttaskfailed", "rebooting"):
                node.move("starting")
                node.errors = []
                self.later(delay / 2, to_ready)

        def to_ready() -> None:
            if node.state != "starting" or node.generation != generation + 1:
                return
            missing = self._unpullable(pool)
            if missing is not None:
                node.errors = [_images.node_pull_error(missing, self.images)]
                node.move("unusable")
                self._maybe_steady(pool)
                self.account.notify()
                return
            if "startTask" in pool.spec:
                start = pool.wire_start_task()
                if start.get("waitForSuccess", True):
                    node.move("waitingforstarttask")
                else:
                    node.move("idle")
                self._run_start_task(pool, node, start)
            else:
                node.move("idle")
            self._maybe_steady(pool)
            self.account.notify()

        wait = delay / 2 if first_delay is None else first_delay
        if wait <= 0:
            to_starting()
            self._fire_timers()
        else:
            self.later(wait, to_starting)

    def remove_node(self, pool: Pool, node: Node, *, requeue: bool) -> None:
        """Take ``node`` out of ``pool``; its running tasks go back to the queue."""
        node.draining = False
        self._evict(node, requeue=requeue)
        if node.id in self._start_runs:
            self._kill(self._start_runs[node.id], "requeue")
        node.move("leavingpool")
        pool.nodes.pop(node.id, None)

    def preempt(self, pool: Pool, node: Node, *, recover_after: float | None) -> None:
        """Preempt ``node``: running tasks are requeued without charging a retry."""
        self._take_down(pool, node, "preempted", recover_after=recover_after)

    def make_unusable(self, pool: Pool, node: Node, *, recover_after: float | None) -> None:
        """Kill ``node``: it becomes unusable and its running tasks are requeued."""
        self._take_down(pool, node, "unusable", recover_after=recover_after)

    def reboot(self, pool: Pool, node: Node, *, option: str = "requeue") -> None:
        """Restart ``node``: its tasks are requeued (``terminate``: ended), then it boots
        again, pulls its pool's images again and runs its start task again.

        ``taskcompletion`` and ``retaineddata`` restart at once too, requeueing what runs:
        the emulator does not hold a reboot until the node's tasks end.
        """
        if option.lower() == "terminate":
            for job_id, task_id in list(node.running):
                job = self.account.jobs.get(job_id)
                task = job.tasks.get(task_id) if job else None
                if task is not None:
                    self.terminate_task(task)
        self._evict(node, requeue=True)
        if node.id in self._start_runs:
            self._kill(self._start_runs[node.id], "requeue")
        node.move("rebooting")
        node.start_task_info = None
        self._boot(pool, node, first_delay=max(0.05, self.allocation_delay / 2))
        self.account.notify()

    def disable_scheduling(self, node: Node, *, option: str = "requeue") -> None:
        """Place no new task on ``node``; what runs on it is requeued (``terminate``: ended;
        ``taskcompletion``: left to finish). It is ``offline`` once nothing runs on it."""
        node.scheduling_enabled = False
        option = option.lower()
        if option == "terminate":
            for job_id, task_id in list(node.running):
                job = self.account.jobs.get(job_id)
                task = job.tasks.get(task_id) if job else None
                if task is not None:
                    self.terminate_task(task)
        if option != "taskcompletion":
            self._evict(node, requeue=True)
        if node.state == "idle":
            node.move("offline")
        self.account.notify()

    def enable_scheduling(self, node: Node) -> None:
        """Let the scheduler place tasks on ``node`` again."""
        node.scheduling_enabled = True
        if node.state == "offline":
            node.move("idle")
        self.account.notify()

    def _take_down(
        self, pool: Pool, node: Node, state: str, *, recover_after: float | None
    ) -> None:
        self._evict(node, requeue=True)
        node.move(state)
        if recover_after is not None:
            self.later(recover_after, lambda: self._recover(pool, node, state))
        self.account.notify()

    def _recover(self, pool: Pool, node: Node, from_state: str) -> None:
        """Bring a preempted or unusable node back, as a fresh VM: start task again."""
        if pool.nodes.get(node.id) is node and node.state == from_state:
            node.start_task_info = None
            self._boot(pool, node)
            self.account.notify()

    def _evict(self, node: Node, *, requeue: bool) -> None:
        for job_id, task_id in list(node.running):
            job = self.account.jobs.get(job_id)
            task = job.tasks.get(task_id) if job else None
            run = self._runs.get((job_id, task_id))
            if run is not None:
                self._kill(run, "requeue")
            if task is not None and task.state in ("running", "preparing") and requeue:
                self._release(task)
                task.move("active")
                task.node_id = None
                task.pool_id = None
                # Batch reports a requeue that is not the task's fault as requeueCount,
                # without charging a retry.
                task.requeue_count += 1
                task.last_requeue_time = utcnow()
            node.running.pop((job_id, task_id), None)
        if node.state == "running":
            node.move("idle")

    def delete_pool(self, pool: Pool) -> None:
        """Mark ``pool`` deleting, take its nodes away, and drop it shortly after."""
        pool.move("deleting")
        pool.touch()
        for node in list(pool.nodes.values()):
            self.remove_node(pool, node, requeue=True)

        def gone() -> None:
            if self.account.pools.get(pool.id) is pool:
                del self.account.pools[pool.id]
                shutil.rmtree(self.account.root / pool.id, ignore_errors=True)

        self.later(max(self.deletion_delay, self.allocation_delay / 2), gone)

    # -- start task -------------------------------------------------------------------------

    def _run_start_task(self, pool: Pool, node: Node, start: Mapping[str, Any]) -> None:
        """Run the pool's start task on ``node`` (once per boot), in a thread of its own.

        It runs in ``$AZ_BATCH_NODE_STARTUP_DIR/wd`` with the node's variables (no job or
        task id: Batch sets neither for a start task), in its ``containerSettings`` image
        when it names one, and records ``startTaskInfo`` as the node agent does.
        """
        if self.simulated:
            now = utcnow()
            node.start_task_info = StartTaskInfo(
                state="completed", start_time=now, end_time=now, exit_code=0
            )
            if node.state == "waitingforstarttask":
                node.move("idle")
            return
        info = StartTaskInfo()
        node.start_task_info = info
        run = _Run(key=("$start", node.id), attempt=node.generation, node=node)
        self._start_runs[node.id] = run
        base = node.root / "startup"
        env = self._environment(
            pool=pool,
            node=node,
            job_id=None,
            task_id=None,
            task_dir=base,
            settings=start.get("environmentSettings", []),
            identity=start.get("userIdentity"),
        )
        thread = threading.Thread(
            target=self._start_task_body,
            args=(pool, node, start, run, base, env),
            name=f"start-task-{node.id[-8:]}",
            daemon=True,
        )
        run.thread = thread
        thread.start()

    def _start_task_body(
        self,
        pool: Pool,
        node: Node,
        start: Mapping[str, Any],
        run: _Run,
        base: Path,
        env: dict[str, str],
    ) -> None:
        retries = int(start.get("maxTaskRetryCount", 0) or 0)
        attempt = 0
        code: int | None = 0
        failure: dict[str, Any] | None = None
        try:
            while True:
                code, failure = self._execute(
                    run,
                    base=base,
                    command=str(start.get("commandLine", "")),
                    env=env,
                    resource_files=start.get("resourceFiles", []),
                    output_files=[],
                    container=start.get("containerSettings"),
                )
                if run.stop_reason is not None:
                    return
                # Only a non-zero exit is retried; a pre-processing error (a resource file
                # or an image that could not be had) is not, as the specification says.
                if failure is None and code != 0 and (retries < 0 or attempt < retries):
                    attempt += 1
                    with self.account.lock:
                        info = node.start_task_info
                        if info is None or node.generation != run.attempt:
                            return
                        # The retry starts now: startTime is reset, and endTime is absent
                        # while the start task runs.
                        info.retry_count = attempt
                        info.last_retry_time = info.start_time = utcnow()
                        info.end_time = None
                    continue
                break
            with self.account.lock:
                info = node.start_task_info
                if info is None or node.generation != run.attempt:
                    return
                info.state = "completed"
                info.end_time = utcnow()
                info.exit_code = code
                if failure is None and code != 0:
                    failure = dict(_EXIT_CODE)
                info.failure = failure
                if node.state == "waitingforstarttask":
                    node.move("idle" if failure is None else "starttaskfailed")
                self._maybe_steady(pool)
                self.account.notify()
        finally:
            with self.account.lock:
                if self._start_runs.get(node.id) is run:
                    del self._start_runs[node.id]
            run.done.set()

    # -- tasks ------------------------------------------------------------------------------

    def _schedulable_jobs(self) -> list[Job]:
        jobs = [j for j in self.account.jobs.values() if j.state == "active"]
        return sorted(jobs, key=lambda j: (-j.priority, j.creation_time))

    def _schedule(self) -> None:
        """Place active tasks on free slots, oldest first, job by job in priority order.

        Each pass costs what it places, not what the jobs hold: active tasks come off the
        job's queue (:meth:`TaskIndex.pop_active`) until the pool has no free slot, and the
        free slots of a pool are counted once per pass (:class:`_FreeSlots`).
        """
        if self._stopping:
            return
        free: dict[str, _FreeSlots] = {}
        for job in self._schedulable_jobs():
            if not job.index.count("active"):
                continue
            pool = self.account.pools.get(job.pool_id or "")
            if pool is None or pool.state != "active":
                continue
            slots = free.get(pool.id)
            if slots is None:
                slots = free[pool.id] = _FreeSlots(pool)
            if slots.empty:
                continue
            limit = int(job.spec.get("maxParallelTasks", -1))
            running = job.index.count("running", "preparing")
            unplaced: list[Task] = []
            for task in job.index.pop_active():
                if not self.dependencies_met(job, task):
                    unplaced.append(task)
                    continue
                if self._at_process_cap() or (limit >= 0 and running >= limit):
                    unplaced.append(task)
                    break
                node = slots.take(task.required_slots)
                if node is None:
                    unplaced.append(task)
                    if slots.empty:
                        break
                    continue  # a smaller task further on may still fit
                self._dispatch(job, pool, node, task)
                running += 1
            job.index.put_back(unplaced)
            if self._at_process_cap():
                return

    def _at_process_cap(self) -> bool:
        """Whether ``max_processes`` task processes run now (simulated runs are not any)."""
        return not self.simulated and len(self._runs) >= self.max_processes

    @staticmethod
    def dependencies_met(job: Job, task: Task) -> bool:
        """A task with ``dependsOn`` waits until each task it names has succeeded."""
        deps = task.spec.get("dependsOn")
        if not deps:
            return True
        ids = [str(i) for i in deps.get("taskIds", [])]
        for rng in deps.get("taskIdRanges", []):
            ids.extend(str(i) for i in range(int(rng["start"]), int(rng["end"]) + 1))
        for dep_id in ids:
            dep = job.tasks.get(dep_id)
            if dep is None or dep.state != "completed" or dep.failure is not None:
                return False
        return True

    def _dispatch(self, job: Job, pool: Pool, node: Node, task: Task) -> None:
        task.attempt += 1
        task.move("running")
        now = utcnow()
        task.start_time = now
        task.end_time = None
        task.exit_code = None
        task.failure = None
        if task.retry_count:
            task.last_retry_time = now
        task.node_id = node.id
        task.pool_id = pool.id
        node.running[(job.id, task.id)] = task.required_slots
        node.total_tasks_run += 1
        if node.state == "idle":
            node.move("running")
        task_dir = node.root / "workitems" / job.id / "job-1" / task.id
        task.task_dir = task_dir
        run = _Run(key=(job.id, task.id), attempt=task.attempt, node=node)
        wall = task.max_wall_clock
        if wall is not None:
            run.deadline = time.monotonic() + wall.total_seconds()
        self._runs[run.key] = run
        settings = [
            *job.spec.get("commonEnvironmentSettings", []),
            *task.spec.get("environmentSettings", []),
        ]
        env = self._environment(
            pool=pool,
            node=node,
            job_id=job.id,
            task_id=task.id,
            task_dir=task_dir,
            settings=settings,
            identity=task.spec.get("userIdentity"),
        )
        if self.simulated:
            self._simulate(task, run, env)
            return
        thread = threading.Thread(
            target=self._task_body,
            args=(task, run, task_dir, env, dict(task.spec)),
            name=f"task-{job.id}-{task.id}",
            daemon=True,
        )
        run.thread = thread
        thread.start()

    def _task_body(
        self, task: Task, run: _Run, task_dir: Path, env: dict[str, str], spec: dict[str, Any]
    ) -> None:
        try:
            code, failure = self._execute(
                run,
                base=task_dir,
                command=str(spec.get("commandLine", "")),
                env=env,
                resource_files=spec.get("resourceFiles", []),
                output_files=spec.get("outputFiles", []),
                container=spec.get("containerSettings"),
            )
            with self.account.lock:
                self._finish(task, run, code, failure)
        finally:
            with self.account.lock:
                if self._runs.get(run.key) is run:
                    del self._runs[run.key]
                self.account.notify()
            run.done.set()

    def _finish(
        self, task: Task, run: _Run, code: int | None, failure: dict[str, Any] | None
    ) -> None:
        """Record how an attempt ended, unless the emulator already moved the task on."""
        if task.attempt != run.attempt or task.state != "running":
            return
        if run.stop_reason in ("requeue", "shutdown", "terminate"):
            return
        self._release(task)
        node = run.node
        if run.stop_reason == "wallclock":
            failure = dict(_WALL_CLOCK)
        elif failure is None and code != 0:
            failure = dict(_EXIT_CODE)
        retryable = (
            run.stop_reason is None and failure is not None and failure["code"] == "FailureExitCode"
        )
        max_retries = task.max_task_retry_count
        task.exit_code = code
        task.end_time = utcnow()
        if retryable and (max_retries < 0 or task.retry_count < max_retries):
            task.retry_count += 1
            task.failure = failure
            task.move("active")
            return
        task.failure = failure
        if failure is None:
            node.total_tasks_succeeded += 1
        task.move("completed")

    def _release(self, task: Task) -> None:
        """Free the slots ``task`` holds on its node."""
        if task.pool_id is None or task.node_id is None:
            return
        pool = self.account.pools.get(task.pool_id)
        node = pool.nodes.get(task.node_id) if pool else None
        if node is None:
            return
        node.running.pop((task.job_id, task.id), None)
        if not node.running and node.state == "running":
            node.move("idle")

    def terminate_task(self, task: Task) -> None:
        """End ``task`` now: an active task completes unrun, a running one is killed."""
        if task.state == "completed":
            return
        run = self._runs.get((task.job_id, task.id))
        if task.state in ("running", "preparing"):
            if run is not None:
                self._kill(run, "terminate")
            self._release(task)
            task.exit_code = 137
            task.failure = dict(_TERMINATED)
        else:
            task.failure = dict(_TERMINATED)
            task.exit_code = None
        task.end_time = utcnow()
        task.move("completed")
        self.account.notify()

    def forget_task(self, task: Task) -> None:
        """Kill ``task``'s process if it runs (the task is being deleted)."""
        run = self._runs.get((task.job_id, task.id))
        if run is not None:
            self._kill(run, "terminate")
        self._release(task)

    def _enforce_wall_clock(self) -> None:
        now = time.monotonic()
        for run in list(self._runs.values()):
            if run.deadline is not None and now >= run.deadline and run.stop_reason is None:
                self._kill(run, "wallclock")

    def _complete_jobs(self) -> None:
        now = utcnow()
        for job in list(self.account.jobs.values()):
            wall = job.spec.get("constraints", {}).get("maxWallClockTime")
            limit = parse_duration(wall) if wall else None
            if job.state == "active" and limit is not None and now - job.creation_time > limit:
                self.terminate_job(job, reason="MaxWallClockTimeExpiry")
            if job.state == "terminating":
                if not job.index.count("running", "preparing"):
                    job.move("completed")
                    job.end_time = utcnow()
                    job.touch()
                    self.job_finished(job)
            elif job.state == "active":
                mode = str(job.spec.get("onAllTasksComplete", "noaction")).lower()
                if mode == "terminatejob" and job.index.count("completed") == len(job.tasks):
                    job.terminate_reason = "AllTasksComplete"
                    job.move("terminating")
                    job.move("completed")
                    job.end_time = utcnow()
                    job.touch()
                    self.job_finished(job)
                elif (
                    str(job.spec.get("onTaskFailure", "noaction")).lower()
                    == ("performexitoptionsjobaction")
                    and job.index.failed
                ):
                    job.terminate_reason = "TaskFailed"
                    self.terminate_job(job, reason="TaskFailed")

    def job_finished(self, job: Job) -> None:
        """Delete the job's auto pool when its lifetime is the job's (and not kept alive)."""
        auto = job.spec.get("poolInfo", {}).get("autoPoolSpecification") or {}
        pool = self.account.pools.get(job.auto_pool_id or "")
        if pool is None or auto.get("keepAlive"):
            return
        if str(auto.get("poolLifetimeOption", "job")).lower() == "job" and pool.state == "active":
            self.delete_pool(pool)

    def terminate_job(self, job: Job, *, reason: str) -> None:
        """Terminate ``job``: running tasks are killed and completed, active ones never run."""
        if job.state in ("completed", "terminating", "deleting"):
            return
        job.terminate_reason = reason
        job.move("terminating")
        job.touch()
        for task in [*job.index.in_state("running"), *job.index.in_state("preparing")]:
            if task.state in ("running", "preparing"):
                self.terminate_task(task)
        self.account.notify()

    # -- processes --------------------------------------------------------------------------

    def _kill(self, run: _Run, reason: str) -> None:
        if run.stop_reason is None:
            run.stop_reason = reason
        if run.simulated:
            # No process to wait for: the attempt ends here. Its in-process call, if one
            # runs, finishes unheeded, as a killed process may have uploaded a result.
            if self._runs.get(run.key) is run:
                del self._runs[run.key]
            if reason == "wallclock" and run.task is not None:
                self._finish(run.task, run, 137, None)
            run.done.set()
            return
        if run.process is not None and run.process.poll() is None:
            _killpg(run.process)

    # -- simulated execution ----------------------------------------------------------------

    def _simulate(self, task: Task, run: _Run, env: dict[str, str]) -> None:
        """Run ``task`` without a process: it ends after ``task_duration`` seconds, and
        not before its in-process worker call (if it is a joblib task) has returned."""
        run.simulated = True
        run.task = task
        if self.simulated_worker != "none" and inprocess.is_worker_task(env):
            run.calling = True
            while len(self._callers) < self.worker_threads:
                caller = threading.Thread(
                    target=self._call_loop,
                    name=f"batch-emulator-worker-{len(self._callers)}",
                    daemon=True,
                )
                self._callers.append(caller)
                caller.start()
            self._calls.put(lambda: self._simulated_call(task, run, env))
        self.later(self.task_duration, lambda: self._simulated_elapsed(task, run))

    def _call_loop(self) -> None:
        """A worker thread: run the queued calls until told to stop (None)."""
        while True:
            call = self._calls.get()
            if call is None:
                return
            call()

    def _simulated_elapsed(self, task: Task, run: _Run) -> None:
        """The task's duration is over (executor thread, lock held)."""
        if self._runs.get(run.key) is not run:
            return
        run.elapsed = True
        if not run.calling:
            self._simulated_end(task, run)

    def _simulated_call(self, task: Task, run: _Run, env: dict[str, str]) -> None:
        """The worker's part of a simulated task (a worker thread, lock not held)."""
        with self.account.lock:
            if self._runs.get(run.key) is not run:
                return  # ended (terminated, requeued) before its turn came
        try:
            outcome = inprocess.run_worker(env, mode=self.simulated_worker)
        except Exception as e:  # an emulator bug: the task fails, the executor lives on
            outcome = inprocess.Outcome(1, stderr=f"in-process worker failed: {e!r}\n")
        with self.account.lock:
            run.outcome = outcome
            run.calling = False
            if run.elapsed and self._runs.get(run.key) is run:
                self._simulated_end(task, run)
            self.account.notify()

    def _simulated_end(self, task: Task, run: _Run) -> None:
        """Complete a simulated attempt with its worker's exit code (0 when none ran)."""
        outcome = run.outcome or inprocess.Outcome(0)
        if outcome.exit_code != 0 and task.task_dir is not None:
            # What the client reads when a task failed: the tail of its stderr.txt.
            with contextlib.suppress(OSError):
                (task.task_dir / "wd").mkdir(parents=True, exist_ok=True)
                (task.task_dir / "stdout.txt").write_text(outcome.stdout, encoding="utf-8")
                (task.task_dir / "stderr.txt").write_text(outcome.stderr, encoding="utf-8")
        del self._runs[run.key]
        run.done.set()
        self._finish(task, run, outcome.exit_code, None)
        self.account.notify()

    def _interpreter(
        self, container: Mapping[str, Any] | None
    ) -> tuple[str | None, dict[str, Any] | None]:
        """The interpreter a run uses, or the ``failureInfo`` of an image that cannot be pulled.

        None (and no failure) is the host's own interpreter, outside any container.
        """
        if not container:
            return (self.bare.python if self.bare is not None else None), None
        image = str(container.get("imageName", ""))
        python = _images.resolve(self.images, image)
        if python is None:
            return None, _images.pull_failure(image, self.images)
        return python, None

    def _environment(
        self,
        *,
        pool: Pool,
        node: Node,
        job_id: str | None,
        task_id: str | None,
        task_dir: Path,
        settings: Iterable[Mapping[str, Any]],
        identity: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        base_url = self._base_url()
        env = {
            **self.host_settings,
            "PATH": _SYSTEM_PATH + os.pathsep + os.path.dirname(self.default_python),
            "LANG": "C.UTF-8",
            "HOME": str(task_dir / "wd"),
            "AZ_BATCH_ACCOUNT_NAME": self.account.name,
            "AZ_BATCH_ACCOUNT_URL": base_url,
            "AZ_BATCH_POOL_ID": pool.id,
            "AZ_BATCH_NODE_ID": node.id,
            "AZ_BATCH_NODE_IS_DEDICATED": "true" if node.is_dedicated else "false",
            "AZ_BATCH_NODE_ROOT_DIR": str(node.root),
            "AZ_BATCH_NODE_SHARED_DIR": str(node.root / "shared"),
            "AZ_BATCH_NODE_STARTUP_DIR": str(node.root / "startup"),
            "AZ_BATCH_NODE_MOUNTS_DIR": str(node.root / "fsmounts"),
            "AZ_BATCH_TASK_DIR": str(task_dir),
            "AZ_BATCH_TASK_WORKING_DIR": str(task_dir / "wd"),
            "AZ_BATCH_TASK_USER": "_azbatch",
            "AZ_BATCH_TASK_USER_IDENTITY": _user_identity(identity),
            "AZ_BATCH_CERTIFICATES_DIR": str(task_dir / "certs"),
            "AZ_BATCH_RESERVED_EPHEMERAL_DISK_SPACE_BYTES": "1000000000",
        }
        # Batch sets neither for a start task.
        if job_id is not None:
            env["AZ_BATCH_JOB_ID"] = job_id
        if task_id is not None:
            env["AZ_BATCH_TASK_ID"] = task_id
        if self.ca_bundle is not None:
            env["REQUESTS_CA_BUNDLE"] = env["SSL_CERT_FILE"] = str(self.ca_bundle)
        # Every node has a metadata endpoint (IMDS); it serves only its pool's identities.
        env[imds.HOST_ENV] = imds.host_for(base_url, node)
        for item in settings:
            if "name" in item:
                env[str(item["name"])] = str(item.get("value", ""))
        return env

    def _execute(
        self,
        run: _Run,
        *,
        base: Path,
        command: str,
        env: dict[str, str],
        resource_files: list[Mapping[str, Any]],
        output_files: list[Mapping[str, Any]],
        container: Mapping[str, Any] | None,
    ) -> tuple[int | None, dict[str, Any] | None]:
        """Stage, run and unstage one attempt; returns (exit code, failureInfo or None).

        The exit code is None when the command never ran (a resource file failed to
        download or the program could not start), as the service reports it.
        """
        workdir = base / "wd"
        if workdir.exists() and run.key[0] != "$start":
            shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        python, failure = self._interpreter(container)
        if failure is not None:
            return None, failure
        layer: Path | None = None
        try:
            if python is not None:
                if self.bare is not None and python == self.bare.python:
                    layer = self._layers / f"{run.node.id[-16:]}-{uuid.uuid4().hex[:12]}"
                    try:
                        python = self.bare.layer(layer)
                    except OSError as e:
                        msg = f"The container could not be created: {e}"
                        return None, {
                            "category": "servererror",
                            "code": "ContainerMiscError",
                            "message": msg,
                            "details": [{"name": "Message", "value": msg}],
                        }
                env = dict(env)
                env["PATH"] = os.path.dirname(python) + os.pathsep + _SYSTEM_PATH
            return self._stage_and_run(
                run,
                base=base,
                workdir=workdir,
                command=command,
                env=env,
                resource_files=resource_files,
                output_files=output_files,
            )
        finally:
            if layer is not None:
                shutil.rmtree(layer, ignore_errors=True)

    def _stage_and_run(
        self,
        run: _Run,
        *,
        base: Path,
        workdir: Path,
        command: str,
        env: dict[str, str],
        resource_files: list[Mapping[str, Any]],
        output_files: list[Mapping[str, Any]],
    ) -> tuple[int | None, dict[str, Any] | None]:
        token_for = self._identity_token(run.node)
        try:
            download_resource_files(resource_files, workdir, token_for=token_for)
        except StagingError as e:
            return None, e.failure_info
        with open(base / "stdout.txt", "wb") as out, open(base / "stderr.txt", "wb") as err:
            with self.account.lock:
                if run.stop_reason is not None:
                    return 137, None
                try:
                    run.process = subprocess.Popen(
                        ["/bin/sh", "-c", command],
                        cwd=workdir,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,
                    )
                except OSError as e:
                    msg = f"The task process could not start: {e}"
                    return None, {
                        "category": "usererror",
                        "code": "CommandProgramNotFound",
                        "message": msg,
                        "details": [{"name": "Message", "value": msg}],
                    }
            returncode = run.process.wait()
            # Children left behind in the group die with the task, as on a node.
            _killpg(run.process)
        code = _exit_status(returncode)
        if run.stop_reason in ("requeue", "shutdown", "terminate"):
            return code, None
        try:
            upload_output_files(output_files, workdir, code, token_for=token_for)
        except StagingError as e:
            return code, e.failure_info
        return code, None

    def _identity_token(self, node: Node) -> Callable[[str, str], str]:
        """What the node agent fetches a file with when it names ``identityReference``: a
        storage token of that identity, if the node's pool has it, else a refusal."""

        def token(resource_id: str, url: str) -> str:
            with self.account.lock:
                pool = self.account.pools.get(node.pool_id)
                identity = pool.identity(resource_id) if pool is not None else None
            if identity is None:
                raise StagingError(
                    "usererror",
                    "BlobAccessDenied",
                    f"Access to {url} was denied: the identity {resource_id} in "
                    f"identityReference is not assigned to the pool {node.pool_id}",
                )
            return imds.token_for(self.tokens, identity, imds.STORAGE_SCOPE)[0]

        return token


class _FreeSlots:
    """A pool's free task slots during one scheduling pass, and which node takes a task.

    The rule is the service's ``nodeFillType``: ``spread`` places a task on the node with
    the fewest tasks (the lowest id among equals), ``pack`` on the fullest node that still
    fits it (the highest id among equals). A heap keeps the next node for a one-slot task
    in O(log nodes), where a scan of 1,000 nodes per placement would make 100,000 tasks
    cost 10^8 steps; tasks that need several slots scan the nodes.
    """

    def __init__(self, pool: Pool) -> None:
        policy = pool.spec.get("taskSchedulingPolicy", {}).get("nodeFillType", "spread")
        self.spread = str(policy).lower() == "spread"
        self.capacity = pool.slots_per_node
        ordered = sorted((n for n in pool.nodes.values() if n.schedulable), key=lambda n: n.id)
        self.nodes = ordered
        self.used = {n.id: n.used_slots for n in ordered}
        self.rank = {n.id: i for i, n in enumerate(ordered)}
        self.free = sum(max(0, self.capacity - u) for u in self.used.values())
        self._heap = [self._entry(n) for n in ordered if self.used[n.id] < self.capacity]
        heapq.heapify(self._heap)

    def _entry(self, node: Node) -> tuple[int, int, int, Node]:
        used = self.used[node.id]
        rank = self.rank[node.id]
        return (used, rank, used, node) if self.spread else (-used, -rank, used, node)

    @property
    def empty(self) -> bool:
        """No slot is free on any node that takes tasks."""
        return self.free <= 0

    def take(self, slots: int) -> Node | None:
        """The node that gets a task of ``slots`` slots (now counted as used), or None."""
        node: Node | None = None
        if slots == 1:
            while self._heap:
                _, _, used, candidate = heapq.heappop(self._heap)
                if used == self.used[candidate.id]:
                    node = candidate
                    break
        else:
            fits = [n for n in self.nodes if self.capacity - self.used[n.id] >= slots]
            if fits:
                order = lambda n: (self.used[n.id], n.id)  # noqa: E731
                node = min(fits, key=order) if self.spread else max(fits, key=order)
        if node is None:
            return None
        self.used[node.id] += slots
        self.free -= slots
        if self.used[node.id] < self.capacity:
            heapq.heappush(self._heap, self._entry(node))
        return node


def _killpg(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)

"""Scale benchmark: the client against a 1,000-slot pool, for 1,000 to 100,000 tasks.

Runs the real client (``joblib.Parallel`` on the azurebatch backend, ``batch_size=1`` so
that every call is one Batch task, each call trivial) against a local account whose tasks
are simulated (``LocalBatch(execution="simulated")``: a task holds its slot for
``duration`` seconds and its call runs in the emulator's process), and measures the CLIENT:

* wall time of the ``Parallel`` call;
* Batch requests, by operation (the emulator's counters);
* blob requests the client made, by operation (counted in this process, around the HTTP
  transport that azure-storage-blob uses: Azurite has no counter, and a proxy would add a
  hop to every request);
* peak RSS of this process during the call (sampled every 50 ms);
* the poll rate: Batch requests per second that neither add tasks nor create or end the
  job, over the time tasks were in the job;
* CPU seconds of this process and of the local account (emulator and Azurite), which say
  where the time went on a shared machine.

The account (emulator and Azurite) runs in a child process, so that its memory and threads
are not the client's. ``bench/run.py`` imports :func:`measure`; ``main`` prints a growth
table::

    .venv/bin/python bench/scale.py [--tasks 1000 10000 100000] [--slots 1000]
                                    [--duration 1.0] [--nodes 10]

Each size of ``main`` runs in a fresh process, so that one row's peak RSS does not carry
the memory an earlier, smaller run left in the interpreter.

``--batch-only`` (:func:`measure_batch_only`) leaves the client library and the blobs out:
the azure-batch SDK adds the tasks and polls as the client does, tasks call nothing
(``simulated_worker="none"``), and the table gives each request's time as the SDK saw it
and inside the emulator's handler, for as many tasks as asked (100,000 take about two
minutes), so that what grows with the job shows::

    .venv/bin/python bench/scale.py --batch-only --tasks 1000 10000 100000
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import operator
import resource
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

import joblib
import psutil

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch.config import BatchConfig

#: Operations that add tasks or create or end the job or pool: not polls.
NOT_POLLS = frozenset(
    {
        "Tasks_CreateTaskCollection",
        "Tasks_CreateTask",
        "Jobs_CreateJob",
        "Jobs_DeleteJob",
        "Jobs_TerminateJob",
        "Jobs_UpdateJob",
        "Jobs_PatchJob",
        "Pools_CreatePool",
        "Pools_DeletePool",
        "Pools_EnablePoolAutoScale",
    }
)
DEFAULT_SIZES = (1_000, 10_000, 100_000)


@dataclass(frozen=True)
class ScaleRow:
    """What one run cost the client."""

    tasks: int
    slots: int
    duration: float
    wall_s: float
    batch_requests: int
    blob_requests: int
    peak_rss_mb: float
    polls_per_s: float
    batch_by_operation: dict[str, int] = field(default_factory=dict)
    blob_by_operation: dict[str, int] = field(default_factory=dict)
    #: Batch tasks the job held at the end (retries and requeues are not new tasks).
    job_tasks: int = 0
    #: Blob requests the client made after the call returned (the background deletion
    #: of the run's blobs), and the seconds until they stopped.
    cleanup_blob_requests: int = 0
    cleanup_s: float = 0.0
    #: Seconds from the start of the call to its first and its last task added.
    first_add_s: float = 0.0
    last_add_s: float = 0.0
    client_cpu_s: float = 0.0
    emulator_cpu_s: float = 0.0
    azurite_cpu_s: float = 0.0


# ------------------------------------------------------------------------------ the account


def _serve(conn: Connection, options: dict[str, Any]) -> None:
    """The child process: a simulated local account, answering the parent over ``conn``."""
    from joblib_azurebatch.emulator import LocalBatch
    from joblib_azurebatch.emulator.command import account_variables

    with LocalBatch(**options) as local:
        emulator = local.emulator
        conn.send(account_variables(local))
        while True:
            command, argument = conn.recv()
            if command == "stop":
                break
            if command == "clear":
                emulator.log.clear()
                conn.send(None)
            elif command == "log":
                conn.send([(r.time, r.operation_id) for r in emulator.requests()])
            elif command == "tasks":
                # The job's id is the config's job_id plus a suffix the run adds.
                with emulator.account.lock:
                    jobs = emulator.account.jobs.values()
                    conn.send(sum(len(j.tasks) for j in jobs if j.id.startswith(str(argument))))
            else:
                conn.send(ValueError(f"unknown command {command!r}"))


class _Account:
    """A simulated local account in a child process, and the variables that reach it."""

    def __init__(self, **options: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, options), daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(120):
            self._process.kill()
            raise RuntimeError("the local account did not start within 120 s")
        self.variables: dict[str, str] = self._conn.recv()

    def ask(self, command: str, argument: object = None) -> Any:
        self._conn.send((command, argument))
        answer = self._conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time so far of the emulator's process (with its in-process workers) and of
        Azurite's (with the small watchdog that runs it)."""
        emulator = azurite = 0.0
        with suppress(psutil.Error):
            root = psutil.Process(self._process.pid)
            times = root.cpu_times()
            emulator = times.user + times.system
            for proc in root.children(recursive=True):
                times = proc.cpu_times()
                azurite += times.user + times.system
        return emulator, azurite

    def close(self) -> None:
        with suppress(OSError):
            self._conn.send(("stop", None))
        self._process.join(60)
        if self._process.is_alive():
            self._process.kill()


# ------------------------------------------------------------------------------ the client


@contextmanager
def _blob_requests(blob_url: str) -> Iterator[Counter[str]]:
    """Count the requests this process sends to the blob endpoint, by Blob operation."""
    from azure.core.pipeline.transport import RequestsTransport

    from joblib_azurebatch.emulator.blobproxy import blob_operation

    netloc = urlsplit(blob_url).netloc
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    original = RequestsTransport.send

    def send(self: RequestsTransport, request: Any, **kwargs: Any) -> Any:
        parts = urlsplit(request.url)
        if parts.netloc == netloc:
            name = blob_operation(request.method, parts.path, parts.query)
            with lock:
                counts[name] += 1
        return original(self, request, **kwargs)

    RequestsTransport.send = send
    try:
        yield counts
    finally:
        RequestsTransport.send = original


@contextmanager
def _peak_rss() -> Iterator[list[int]]:
    """Sample this process's RSS every 50 ms; the list's one item is the peak in bytes."""
    me = psutil.Process()
    peak = [me.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], me.memory_info().rss)

    thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], me.memory_info().rss)


def _settle(counts: Counter[str], *, quiet: float = 2.0, limit: float = 300.0) -> float:
    """Wait until the client sends no blob request for ``quiet`` seconds (its background
    deletion of the run's blobs is over), at most ``limit``; the seconds waited, quiet
    period excluded. The account must outlive that deletion, or it would retry at exit."""
    start = last_change = time.perf_counter()
    try:  # the library's background deleter, when it has one: wait for it first
        from joblib_azurebatch.sweeper import SWEEPER
    except ImportError:
        pass
    else:
        SWEEPER.wait(limit)
    seen = sum(counts.values())
    while time.perf_counter() - last_change < quiet and time.perf_counter() - start < limit:
        time.sleep(0.2)
        now = sum(counts.values())
        if now != seen:
            seen, last_change = now, time.perf_counter()
    return last_change - start


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _poll_rate(log: Sequence[tuple[float, str]]) -> float:
    """Polls per second while tasks were in the job: from the first task added to the
    last request that was not an end-of-run call."""
    adds = [t for t, op in log if op in ("Tasks_CreateTaskCollection", "Tasks_CreateTask")]
    if not adds:
        return 0.0
    start = min(adds)
    polls = [t for t, op in log if op not in NOT_POLLS and t >= start]
    if not polls:
        return 0.0
    span = max(polls) - start
    return len(polls) / span if span > 0 else 0.0


def measure(
    tasks: int,
    *,
    slots: int = 1000,
    duration: float = 1.0,
    nodes: int | None = None,
    simulated_worker: str = "inline",
    worker_threads: int = 8,
    config: Mapping[str, Any] | None = None,
) -> ScaleRow:
    """Run ``tasks`` trivial calls, one Batch task each, on a simulated pool of ``slots``
    slots (``nodes`` nodes: by default one per 100 slots) whose tasks take ``duration``
    seconds, and measure the client. ``config`` overrides fields of the client's
    `BatchConfig` (say ``{"poll_interval": 2.0}``)."""
    if tasks < 1 or slots < 1:
        raise ValueError("tasks and slots must be at least 1")
    nodes = nodes if nodes is not None else max(1, slots // 100)
    if slots % nodes:
        raise ValueError(f"{slots} slots do not split evenly over {nodes} nodes")
    account = _Account(
        nodes=nodes,
        slots_per_node=slots // nodes,
        execution="simulated",
        task_duration=duration,
        simulated_worker=simulated_worker,
        worker_threads=worker_threads,
    )
    try:
        pool_id = f"scale-{uuid.uuid4().hex[:8]}"
        job_id = f"scale-{uuid.uuid4().hex[:12]}"
        cfg = BatchConfig.from_env(environ=account.variables)
        fields: dict[str, Any] = {
            "pool_id": pool_id,
            "job_id": job_id,
            "keep_job": True,  # so that its tasks can be counted afterwards
            "keep_pool": True,  # the warm-up's pool serves the measured run
            "vm_size": "standard_d32s_v3",
        }
        fields.update(config or {})
        cfg = dataclasses.replace(cfg, **fields)
        # Warm the pool first (nodes come up, the client's first requests are made), so that
        # the row measures the tasks rather than the pool's start.
        with joblib.parallel_config(backend="azurebatch", config=cfg):
            joblib.Parallel(n_jobs=-1, batch_size=1)(
                joblib.delayed(operator.mul)(i, 2) for i in range(2)
            )
        job_id = f"scale-{uuid.uuid4().hex[:12]}"
        cfg = dataclasses.replace(cfg, job_id=job_id)
        account.ask("clear")
        account_cpu = account.cpu_seconds()
        client_cpu = _cpu_seconds()
        with _blob_requests(cfg.storage_url or "") as blobs, _peak_rss() as peak:
            start = time.perf_counter()
            started = time.time()  # the clock of the emulator's request log
            with joblib.parallel_config(backend="azurebatch", config=cfg):
                out = joblib.Parallel(n_jobs=-1, batch_size=1)(
                    joblib.delayed(operator.mul)(i, 2) for i in range(tasks)
                )
            wall = time.perf_counter() - start
            during = Counter(blobs)
            cleanup_s = _settle(blobs)
        client_cpu = _cpu_seconds() - client_cpu
        emulator_end, azurite_end = account.cpu_seconds()
        if out != [2 * i for i in range(tasks)]:
            raise RuntimeError("the run returned wrong results")
        log = account.ask("log")
        job_tasks = account.ask("tasks", job_id)
    finally:
        account.close()
    by_op = Counter(op for _, op in log)
    adds = [t - started for t, op in log if op == "Tasks_CreateTaskCollection"] or [0.0]
    return ScaleRow(
        tasks=tasks,
        slots=slots,
        duration=duration,
        wall_s=round(wall, 2),
        batch_requests=sum(by_op.values()),
        blob_requests=sum(during.values()),
        peak_rss_mb=round(peak[0] / 2**20, 1),
        polls_per_s=round(_poll_rate(log), 2),
        batch_by_operation=dict(sorted(by_op.items())),
        blob_by_operation=dict(sorted(during.items())),
        cleanup_blob_requests=sum(blobs.values()) - sum(during.values()),
        cleanup_s=round(cleanup_s, 1),
        job_tasks=int(job_tasks),
        first_add_s=round(min(adds), 2),
        last_add_s=round(max(adds), 2),
        client_cpu_s=round(client_cpu, 1),
        emulator_cpu_s=round(emulator_end - account_cpu[0], 1),
        azurite_cpu_s=round(azurite_end - account_cpu[1], 1),
    )


# ------------------------------------------------------------------------------ Batch only


@dataclass(frozen=True)
class BatchOnlyRow:
    """The emulator alone at scale: no client library, no blobs, tasks that call nothing."""

    tasks: int
    slots: int
    duration: float
    wall_s: float
    #: Milliseconds per request, by operation: (median, 95th percentile, max), as the SDK
    #: saw them (its own work included) and inside the emulator's handler.
    latency_ms: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    handler_ms: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    #: Tasks whose wire form the listings built, per task.
    examined_per_task: float = 0.0
    most_running: int = 0


def measure_batch_only(
    tasks: int, *, slots: int = 1000, duration: float = 1.0, nodes: int | None = None
) -> BatchOnlyRow:
    """Drive a simulated emulator with the azure-batch SDK alone, as the client's submitter
    and tracker do (collections of 100 tasks added from 4 threads; the task counts polled
    every 0.2 s and the tasks completed since the newest seen listed), with tasks that run
    nothing (``simulated_worker="none"``). What it measures is the emulator: how long each
    request takes as the job grows to ``tasks`` tasks."""
    import datetime as dt
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    from azure.batch import BatchClient
    from azure.batch import models as m
    from azure.core.credentials import AzureNamedKeyCredential

    from joblib_azurebatch.emulator import BatchEmulator, handlers

    nodes = nodes if nodes is not None else max(1, slots // 100)
    timings: dict[str, list[float]] = {}
    inside: dict[str, list[float]] = {}
    lock = threading.Lock()
    measured = ("Tasks_CreateTaskCollection", "Jobs_GetJobTaskCounts", "Tasks_ListTasks")
    originals = {op: handlers.HANDLERS[op] for op in measured}

    def clocked(op: str, handler: Any) -> Any:
        def run(ctx: Any) -> Any:
            start = time.perf_counter()
            try:
                return handler(ctx)
            finally:
                inside.setdefault(op, []).append(time.perf_counter() - start)  # lock held

        return run

    def timed(name: str, call: Any) -> Any:
        start = time.perf_counter()
        out = call()
        with lock:
            timings.setdefault(name, []).append(time.perf_counter() - start)
        return out

    handlers.HANDLERS.update({op: clocked(op, h) for op, h in originals.items()})
    emulator = BatchEmulator(execution="simulated", task_duration=duration, simulated_worker="none")
    try:
        emulator.start()
        client = BatchClient(
            emulator.url, AzureNamedKeyCredential(emulator.account_name, emulator.key)
        )
        image = m.BatchVmImageReference(publisher="canonical", offer="ubuntu", sku="22_04-lts")
        client.create_pool(
            m.BatchPoolCreateOptions(
                id="scale",
                vm_size="standard_d32s_v3",
                target_dedicated_nodes=nodes,
                task_slots_per_node=slots // nodes,
                virtual_machine_configuration=m.VirtualMachineConfiguration(
                    image_reference=image, node_agent_sku_id="batch.node.ubuntu 22.04"
                ),
            )
        )
        while client.get_pool("scale").allocation_state != m.AllocationState.STEADY:
            time.sleep(0.05)
        client.create_job(
            m.BatchJobCreateOptions(id="scale", pool_info=m.BatchPoolInfo(pool_id="scale"))
        )
        index = emulator.account.jobs["scale"].index
        start = time.perf_counter()

        def add(first: int) -> None:
            group = [
                m.BatchTaskCreateOptions(id=f"t{i}", command_line="python -m worker")
                for i in range(first, min(first + 100, tasks))
            ]
            timed(
                "Tasks_CreateTaskCollection",
                lambda: client.create_task_collection("scale", m.BatchTaskGroup(task_values=group)),
            )

        seen: set[str] = set()
        newest: dt.datetime | None = None
        most_running = 0
        with ThreadPoolExecutor(4) as adders:
            adding = [adders.submit(add, first) for first in range(0, tasks, 100)]
            while len(seen) < tasks:
                counts = timed(
                    "Jobs_GetJobTaskCounts", lambda: client.get_job_task_counts("scale")
                ).task_counts
                most_running = max(most_running, counts.running)
                if counts.completed > len(seen):
                    query = "state eq 'completed'"
                    if newest is not None:
                        since = newest - dt.timedelta(seconds=5)
                        query += (
                            " and stateTransitionTime ge "
                            f"datetime'{since.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}'"
                        )
                    listed = timed(
                        "Tasks_ListTasks",
                        lambda q=query: list(
                            client.list_tasks(
                                "scale", filter=q, select=["id", "stateTransitionTime"]
                            )
                        ),
                    )
                    for task in listed:
                        seen.add(task.id)
                        if newest is None or task.state_transition_time > newest:
                            newest = task.state_transition_time
                time.sleep(0.2)
            for future in adding:
                future.result()
        wall = time.perf_counter() - start
        examined = index.examined
    finally:
        emulator.stop()
        handlers.HANDLERS.update(originals)

    def summary(values: list[float]) -> tuple[float, float, float]:
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return (
            round(1000 * statistics.median(ordered), 1),
            round(1000 * p95, 1),
            round(1000 * ordered[-1], 1),
        )

    return BatchOnlyRow(
        tasks=tasks,
        slots=slots,
        duration=duration,
        wall_s=round(wall, 1),
        latency_ms={name: summary(v) for name, v in sorted(timings.items())},
        handler_ms={name: summary(v) for name, v in sorted(inside.items())},
        requests={name: len(v) for name, v in sorted(timings.items())},
        examined_per_task=round(examined / tasks, 2),
        most_running=most_running,
    )


def batch_only_table(rows: Sequence[BatchOnlyRow]) -> list[str]:
    """The Batch-only table, in Markdown: request latencies as the job grows."""
    lines = [
        "| tasks | wall s | most running | examined per task | operation | requests "
        "| SDK ms (median / p95 / max) | handler ms (median / p95 / max) |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        for op in sorted(r.latency_ms):
            sdk, handler = r.latency_ms[op], r.handler_ms.get(op, (0.0, 0.0, 0.0))
            lines.append(
                f"| {r.tasks:,} | {r.wall_s} | {r.most_running} | {r.examined_per_task} "
                f"| `{op}` | {r.requests[op]} | {sdk[0]} / {sdk[1]} / {sdk[2]} "
                f"| {handler[0]} / {handler[1]} / {handler[2]} |"
            )
    return lines


# ------------------------------------------------------------------------------ the table


def _measure_in_child(conn: Connection, tasks: int, options: dict[str, Any]) -> None:
    try:
        conn.send(measure(tasks, **options))
    except BaseException as e:
        conn.send(RuntimeError(f"{type(e).__name__}: {e}"))


def _fresh(tasks: int, options: dict[str, Any]) -> ScaleRow:
    """:func:`measure` in a new process, so that its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_measure_in_child, args=(child, tasks, options))
    process.start()
    child.close()
    answer = parent.recv()
    process.join()
    if isinstance(answer, Exception):
        raise answer
    row: ScaleRow = answer
    return row


def table(rows: Sequence[ScaleRow]) -> list[str]:
    """The growth table, in Markdown."""
    lines = [
        "| tasks | wall s | tasks/s | Batch requests | per task | blob requests | per task "
        "| peak RSS MB | polls/s | CPU s: client | emulator | Azurite |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.tasks:,} | {r.wall_s:.1f} | {r.tasks / r.wall_s:.0f} | {r.batch_requests:,} "
            f"| {r.batch_requests / r.tasks:.3f} | {r.blob_requests:,} "
            f"| {r.blob_requests / r.tasks:.2f} | {r.peak_rss_mb:.0f} | {r.polls_per_s:.1f} "
            f"| {r.client_cpu_s:.0f} | {r.emulator_cpu_s:.0f} | {r.azurite_cpu_s:.0f} |"
        )
    ops = sorted({op for r in rows for op in r.batch_by_operation})
    lines += ["", "| Batch operation | " + " | ".join(f"{r.tasks:,}" for r in rows) + " |"]
    lines.append("| --- |" + " ---: |" * len(rows))
    for op in ops:
        counts = " | ".join(f"{r.batch_by_operation.get(op, 0):,}" for r in rows)
        lines.append(f"| `{op}` | {counts} |")
    blob_ops = sorted({op for r in rows for op in r.blob_by_operation})
    lines += ["", "| blob operation | " + " | ".join(f"{r.tasks:,}" for r in rows) + " |"]
    lines.append("| --- |" + " ---: |" * len(rows))
    for op in blob_ops:
        counts = " | ".join(f"{r.blob_by_operation.get(op, 0):,}" for r in rows)
        lines.append(f"| `{op}` | {counts} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--slots", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=None, help="default: one per 100 slots")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds a task runs")
    parser.add_argument("--poll-interval", type=float, default=None)
    parser.add_argument("--simulated-worker", choices=("inline", "main"), default="inline")
    parser.add_argument(
        "--batch-only",
        action="store_true",
        help="the emulator alone, driven by the SDK: request latencies as the job grows",
    )
    args = parser.parse_args(argv)
    if args.batch_only:
        batch_rows = []
        for size in sorted(args.tasks):
            found = measure_batch_only(
                size, slots=args.slots, duration=args.duration, nodes=args.nodes
            )
            batch_rows.append(found)
            print(f"{size:,} tasks: {found.wall_s} s", flush=True)
        print()
        print("\n".join(batch_only_table(batch_rows)))
        return 0
    options: dict[str, Any] = {
        "slots": args.slots,
        "nodes": args.nodes,
        "duration": args.duration,
        "simulated_worker": args.simulated_worker,
    }
    if args.poll_interval is not None:
        options["config"] = {"poll_interval": args.poll_interval}
    rows = []
    for size in sorted(args.tasks):
        row = _fresh(size, options)
        rows.append(row)
        print(
            f"{size:,} tasks: {row.wall_s:.1f} s (tasks added from {row.first_add_s:.1f} s to "
            f"{row.last_add_s:.1f} s), {row.job_tasks:,} Batch tasks, "
            f"{row.batch_requests:,} Batch requests, {row.blob_requests:,} blob requests, "
            f"peak RSS {row.peak_rss_mb:.0f} MB",
            flush=True,
        )
    print()
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

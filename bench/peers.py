"""The three backends the benchmark compares, each behind the same ``run(calls)``.

* azurebatch on a warm local account: ``LocalBatch(nodes=2, slots_per_node=2)``, the pool
  kept between calls (``keep_pool=True``) and warmed by two calls before anything is timed,
  as a pool that a user keeps between runs on Azure would be.
* dask.distributed: a ``LocalCluster`` of 4 single-thread worker processes, through
  joblib's own ``"dask"`` backend.
* loky: joblib's default process pool, 4 workers.

Every ``run`` is one ``joblib.Parallel(n_jobs=4)`` call on the same delayed calls, so the
backends differ only in what carries the calls. The azurebatch peer also observes each
call (:class:`CallStats`): Batch requests from the emulator's per-operation counters, the
bytes the client uploaded (:class:`UploadCounter`), its tasks, and the objects each node
fetched into its cache.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import joblib

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.storage import BlobStore

#: Slots (azurebatch) and workers (dask, loky): the same capacity for every backend.
WORKERS = 4
#: The operation whose requests are the tracker's polls of a job's task counts.
POLL_OPERATION = "Jobs_GetJobTaskCounts"
#: The run's closing log line: ``job J on pool P: 40 tasks (0 retried, ...``.
_USAGE_LINE = re.compile(r"job (?P<job>\S+) on pool \S+: (?P<tasks>\d+) tasks? \(")


def parallel(calls: Iterable[Any], **config: Any) -> list[Any]:
    """One ``Parallel(n_jobs=WORKERS)`` call on ``calls`` under ``parallel_config(**config)``."""
    with joblib.parallel_config(**config):
        return list(joblib.Parallel(n_jobs=WORKERS)(calls))


def warm_up(peer: Peer) -> None:
    """A few tiny calls: workers started, imports done, connections open."""
    from bench.work import tiny

    peer.run(joblib.delayed(tiny)(i) for i in range(WORKERS))


# --------------------------------------------------------------------------- observing


class UploadCounter:
    """Counts what the client hands to blob storage while it is active.

    ``BlobStore.upload`` is the client's one writer of blobs (``upload_if_absent`` goes
    through it; results are written by the nodes, through their own clients, and are not
    seen here). Wrapping it for the duration counts every blob the backend's own store
    writes, whichever store instance the run's account holds, without reaching into the
    backend. An upload is counted once attempted, even if the service refused it
    (``overwrite=False`` on a blob that exists): those bytes crossed the network too.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.blobs: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[UploadCounter]:
        original = BlobStore.upload
        counter = self

        def upload(store: BlobStore, name: str, data: bytes, *, overwrite: bool = True) -> None:
            try:
                original(store, name, data, overwrite=overwrite)
            finally:
                with counter._lock:
                    counter.blobs.append((name, len(data)))

        with mock.patch.object(BlobStore, "upload", upload):
            yield self

    @property
    def total(self) -> int:
        with self._lock:
            return sum(n for _, n in self.blobs)

    def by_kind(self) -> dict[str, int]:
        """Bytes per kind of blob: the content-addressed ``objects``, the task
        ``payloads``, anything else (``other``)."""
        out: Counter[str] = Counter()
        with self._lock:
            for name, n in self.blobs:
                kind = "objects" if "/objects/" in name else "payloads"
                if not name.endswith("/payload") and kind == "payloads":
                    kind = "other"
                out[kind] += n
        return dict(out)


class _UsageLines(logging.Handler):
    """Keeps the runs' closing lines, which count each run's tasks."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.tasks: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = _USAGE_LINE.search(record.getMessage())
        if match:
            self.tasks.append(int(match["tasks"]))


@dataclass
class CallStats:
    """What one azurebatch call cost on the wire (sums over several calls add up)."""

    calls: int = 0
    tasks: int | None = 0
    requests: Counter[str] = field(default_factory=Counter)
    uploaded: int = 0
    uploaded_blobs: int = 0
    upload_kinds: Counter[str] = field(default_factory=Counter)
    node_fetches: list[int] = field(default_factory=list)

    def __add__(self, other: CallStats) -> CallStats:
        fetches = [a + b for a, b in zip(self.node_fetches, other.node_fetches, strict=False)]
        return CallStats(
            calls=self.calls + other.calls,
            tasks=None if self.tasks is None or other.tasks is None else self.tasks + other.tasks,
            requests=self.requests + other.requests,
            uploaded=self.uploaded + other.uploaded,
            uploaded_blobs=self.uploaded_blobs + other.uploaded_blobs,
            upload_kinds=self.upload_kinds + other.upload_kinds,
            node_fetches=fetches or self.node_fetches or other.node_fetches,
        )


# --------------------------------------------------------------------------- peers


class Peer:
    """One backend: ``run`` a ``Parallel`` call, ``close`` what it started."""

    name = ""

    def run(self, calls: Iterable[Any]) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop what the peer started (safe to call more than once)."""

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AzureBatchPeer(Peer):
    """azurebatch with ``cfg``; with the ``local`` account that ``cfg`` points at, every
    call is also observed (:attr:`last`)."""

    name = "azurebatch"

    def __init__(self, cfg: BatchConfig, *, local: Any = None) -> None:
        self.cfg = cfg
        self.local = local
        self.last: CallStats | None = None
        self._usage = _UsageLines()
        self._run_logger = logging.getLogger("joblib_azurebatch.run")
        self._old_level = self._run_logger.level
        self._run_logger.addHandler(self._usage)
        if self._run_logger.getEffectiveLevel() > logging.INFO:
            self._run_logger.setLevel(logging.INFO)

    @classmethod
    def on_local_account(cls, *, nodes: int = 2, slots: int = 2) -> AzureBatchPeer:
        """Start a local account, create its pool and warm it with two calls."""
        from joblib_azurebatch.emulator import LocalBatch

        local = LocalBatch(nodes=nodes, slots_per_node=slots).start()
        try:
            peer = cls(local.config(pool_id="bench", keep_pool=True), local=local)
            warm_up(peer)  # creates the pool and waits for its nodes
            warm_up(peer)  # a call on a pool that is up, as every timed call will be
        except BaseException:
            local.stop()
            raise
        return peer

    def child_spec(self) -> dict[str, Any]:
        """What a fresh process needs to run on the same pool (``bench.rss``): the
        account's variables and the config's pool fields, as JSON."""
        if self.local is None:
            raise RuntimeError("only a peer on a local account can hand it to a child")
        fields = (
            "pool_id",
            "keep_pool",
            "dedicated_nodes",
            "spot_nodes",
            "task_slots_per_node",
            "poll_interval",
            "image",
        )
        return {
            "environ": self.local.environment(),
            "overrides": {name: getattr(self.cfg, name) for name in fields},
        }

    @classmethod
    def from_child_spec(cls, spec: dict[str, Any]) -> AzureBatchPeer:
        """The peer of :meth:`child_spec`, in the child."""
        return cls(BatchConfig.from_env(environ=spec["environ"], **spec["overrides"]))

    def _node_caches(self) -> list[int]:
        """Objects in each node's cache (downloads, as a task fetches each object once)."""
        if self.local is None:
            return []
        pool = self.local.emulator.account.pools.get(self.cfg.pool_id)
        if pool is None:
            return []
        counts = []
        for node in sorted(list(pool.nodes.values()), key=lambda n: n.id):
            cache = Path(node.root) / "shared" / "joblib-azurebatch" / "objects"
            names = [p for p in cache.iterdir()] if cache.is_dir() else []
            counts.append(sum(1 for p in names if not p.name.startswith(".")))
        return counts

    def run(self, calls: Iterable[Any]) -> list[Any]:
        if self.local is None:
            return parallel(calls, backend="azurebatch", config=self.cfg)
        counter = UploadCounter()
        requests_before = Counter(self.local.emulator.counters)
        caches_before = self._node_caches()
        runs_before = len(self._usage.tasks)
        with counter.active():
            out = parallel(calls, backend="azurebatch", config=self.cfg)
        caches_after = self._node_caches()
        closed = self._usage.tasks[runs_before:]
        self.last = CallStats(
            calls=1,
            tasks=sum(closed) if closed else None,
            requests=Counter(self.local.emulator.counters) - requests_before,
            uploaded=counter.total,
            uploaded_blobs=len(counter.blobs),
            upload_kinds=Counter(counter.by_kind()),
            node_fetches=[a - b for a, b in zip(caches_after, caches_before, strict=False)],
        )
        return out

    def close(self) -> None:
        self._run_logger.removeHandler(self._usage)
        self._run_logger.setLevel(self._old_level)
        if self.local is not None:
            self.local.stop()
            self.local = None


class DaskPeer(Peer):
    """dask.distributed on this machine: a LocalCluster of single-thread worker processes
    (its scheduler in this process, as ``Client()`` with no address makes it)."""

    name = "dask"

    def __init__(self, workers: int = WORKERS) -> None:
        from dask.distributed import Client, LocalCluster

        self.cluster = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        self.client = Client(self.cluster)  # type: ignore[no-untyped-call]
        warm_up(self)

    def run(self, calls: Iterable[Any]) -> list[Any]:
        return parallel(calls, backend="dask")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            self.cluster.close()


class LokyPeer(Peer):
    """joblib's loky process pool, reused between calls as joblib does.

    Its workers would end after 300 s idle (while the other backends' rows run); a longer
    ``idle_worker_timeout`` keeps them up, so loky is timed warm like the others.
    """

    name = "loky"

    def __init__(self) -> None:
        warm_up(self)

    def run(self, calls: Iterable[Any]) -> list[Any]:
        return parallel(calls, backend="loky", idle_worker_timeout=3600)


def start(name: str) -> Peer:
    """The peer called ``name``, started and warm."""
    if name == "azurebatch":
        return AzureBatchPeer.on_local_account()
    if name == "dask":
        return DaskPeer()
    if name == "loky":
        return LokyPeer()
    raise ValueError(f"no peer {name!r}: azurebatch, dask or loky")

"""The client side of ``BatchConfig(resume=True)``: which calls have a stored result.

For each joblib batch a resumable run sends, `Resumer.plan` computes the key of every call
(`memo.call_key`) and reads the stored record of each (in parallel), verifying it with the
key of the job that wrote it (derived from the container's results key, `memo.job_key`).
A batch whose calls all have one is answered at once, with no task; any other batch is sent
as a `memo.Memo` that runs only the calls without one and stores each result as it
finishes; `Plan.merge` puts the two together in joblib's order.

Before its first batch, a resumable run waits for the earlier run of the same calls whose
client died (`wait_for_earlier`): its job's tasks still run on the pool, and each call they
finish is stored, so waiting for them is what keeps a call from running twice. The earlier
job is then deleted; its stored results stay.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from . import shutdown
from .errors import AzureBatchError, PayloadError, ServiceError
from .liveness import ClientRecord, client_gone
from .memo import (
    RESULTS_KEY_BLOB,
    Memo,
    call_key,
    environment_fingerprint,
    job_key,
    read_record,
    record_blob,
)
from .payload import job_prefix, node_identity_of, payload_blob, task_keys
from .service import BatchApi
from .storage import BlobStore

__all__ = [
    "MISSING",
    "RESUME_METADATA",
    "Plan",
    "Resumer",
    "StoredResults",
    "results_key",
    "stored_results",
]

_log = logging.getLogger(__name__)

#: Job metadata: the key of a resumable run's first call, by which a re-run finds it.
RESUME_METADATA = "joblib-azurebatch-resume"
#: Parallel reads of stored results per batch.
_READERS = 8


def results_key(store: BlobStore) -> bytes:
    """The container's results key, from which every resumable job's key is derived.

    With the storage account key it is derived from that key (`BlobStore.derived_secret`):
    then no one who can only read or write the container's blobs can sign a stored
    result. A client that signs in with Entra ID has no such key: the results key is then
    a random blob, ``joblib-azurebatch/results-key``, created by the first run that needs
    it (two clients creating it at once agree: the second one's upload finds it there),
    and whoever can read that blob and write the container can sign one (docs/resume.md).
    """
    derived = store.derived_secret("results")
    if derived is not None:
        return derived
    try:
        return store.download(RESULTS_KEY_BLOB)
    except FileNotFoundError:
        store.upload_if_absent(RESULTS_KEY_BLOB, secrets.token_bytes(32))
        return store.download(RESULTS_KEY_BLOB)


@dataclass
class Plan:
    """One batch's calls: their keys and the results already stored for some of them."""

    keys: list[str]
    found: dict[int, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def complete(self) -> bool:
        return len(self.found) == len(self.keys)

    def values(self) -> list[Any]:
        return [self.found[i] for i in range(len(self.keys))]

    def merge(self, computed: Sequence[Any]) -> list[Any]:
        """The batch's results: stored ones where the task skipped the call."""
        if len(computed) != len(self.keys):
            raise PayloadError(
                f"a resumable task returned {len(computed)} results for {len(self.keys)} calls"
            )
        # The task skipped exactly the calls found (by index: a value is never compared,
        # since an array's == is no truth value).
        return [self.found.get(i, value) for i, value in enumerate(computed)]


class Resumer:
    """Looks up and wraps the batches of one resumable run."""

    def __init__(
        self,
        store: BlobStore,
        *,
        image: str,
        any_environment: bool,
        sas_expiry: float,
        cache: bool = False,
    ) -> None:
        self._store = store
        self._any_environment = any_environment
        #: True: a result of any run is taken (``cache=True``); False: only those of the
        #: runs of the same calls (whose first call has the key `run`).
        self.cache = cache
        self.run = ""
        self._expiry = timedelta(seconds=sas_expiry)
        self.environment = environment_fingerprint(image)
        self._results_key: bytes | None = None
        self._readers = ThreadPoolExecutor(
            _READERS, thread_name_prefix="azurebatch-resume", initializer=shutdown.hold_signals
        )
        self._identity = node_identity_of(store) is not None

    @property
    def results_key(self) -> bytes:
        if self._results_key is None:
            self._results_key = results_key(self._store)
        return self._results_key

    def signing_key(self, job_id: str) -> bytes:
        """The key the job ``job_id`` signs its payloads and results with."""
        return job_key(self.results_key, job_id)

    def close(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)

    # -- looking up

    def keys(self, calls: Any) -> list[str]:
        """The key of each call of ``calls`` (a joblib ``BatchedCalls``), in order."""
        items = _items(calls)
        if items is None:
            raise PayloadError(
                f"resume=True runs joblib batches of calls, not {type(calls).__name__}"
            )
        digests: dict[int, tuple[Any, str]] = {}
        return [call_key(*item, cache=digests) for item in items]

    def plan(self, keys: Sequence[str]) -> Plan:
        """The calls ``keys`` with the stored results this run may take."""
        plan = Plan(keys=list(keys))
        for index, found in enumerate(self.stored(plan.keys)):
            if found is not None:
                plan.found[index] = found[0]
        return plan

    def stored(self, keys: Sequence[str]) -> list[tuple[Any] | None]:
        """Per key, ``(value,)`` of its verified stored result that this run may take, or
        None; read in parallel."""
        return list(self._readers.map(self._lookup, keys))

    def _lookup(self, key: str) -> tuple[Any] | None:
        try:
            data = self._store.download(record_blob(key))
        except FileNotFoundError:
            return None
        except (AzureBatchError, OSError) as e:  # overwritten while read, refused: run it
            _log.warning("could not read the stored result of call %s (%s): it runs again", key, e)
            return None
        try:
            record = read_record(data, self.signing_key, key=key)
            if not self.cache and record.run != self.run:
                _log.info("call %s was computed by another run: it runs again", key)
                return None
            if record.environment != self.environment and not self._any_environment:
                _log.info("call %s was computed in another environment: it runs again", key)
                return None
            return (record.result(),)
        except Exception as e:
            _log.warning("the stored result of call %s is refused (%s): it runs again", key, e)
            return None

    def wrap(self, calls: Any, plan: Plan) -> Memo:
        """What a task runs for ``calls``: the calls without a stored result, each with
        where its record goes (a read-write SAS URL for that one blob, or its name)."""
        refs: list[str | None] = []
        for index, key in enumerate(plan.keys):
            if index in plan.found:
                refs.append(None)
            elif self._identity:
                refs.append(record_blob(key))
            else:
                refs.append(
                    self._store.sas_url(
                        record_blob(key), read=True, write=True, expiry=self._expiry
                    )
                )
        return Memo(calls, plan.keys, refs, self.environment, run=self.run)

    # -- the earlier run

    def wait_for_earlier(
        self,
        service: BatchApi,
        first_key: str,
        *,
        poll_interval: float,
        stalled_after: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] = _log.warning,
    ) -> list[str]:
        """Wait until the jobs of earlier runs of these calls, whose clients are gone, have
        no task left to run; delete them; return their ids.

        Waiting is what keeps a call that such a job is running from running twice. It is
        never unbounded: a job whose pool is gone is not waited for, and one of whose tasks
        none runs or ends for ``stalled_after`` seconds (no node, a pool resized to zero)
        is given up; either way it is deleted, and its unfinished calls run in this run.
        """
        earlier = [
            job
            for job in service.list_jobs()
            if job.metadata.get(RESUME_METADATA) == first_key and job.state == "active"
        ]
        orphans = []
        for job in earlier:
            record = ClientRecord.from_metadata(job.metadata)
            if record is not None and client_gone(record) is not None:
                orphans.append(job)
        for job in orphans:
            if job.pool_id and service.get_pool(job.pool_id) is not None:
                self._wait_for(service, job.job_id, poll_interval, stalled_after, clock, sleep, log)
            service.delete_job(job.job_id)
            self._store.delete_prefix(job_prefix(job.job_id))
        return [job.job_id for job in orphans]

    @staticmethod
    def _wait_for(
        service: BatchApi,
        job_id: str,
        poll_interval: float,
        stalled_after: float,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        log: Callable[[str], None],
    ) -> None:
        said = False
        last: tuple[int, int, int] | None = None
        moved = clock()
        while True:
            try:
                counts = service.task_counts(job_id)
            except ServiceError as e:
                if e.status_code == 404:  # deleted meanwhile (cleanup, another re-run)
                    return
                raise
            left = counts.active + counts.running
            if left == 0:
                return
            now = (counts.active, counts.running, counts.completed)
            # A running task is progress however long its calls take; what is given up is
            # a job whose tasks wait for nodes that do not come.
            if now != last or counts.running > 0:
                last, moved = now, clock()
            elif clock() - moved > stalled_after:
                log(
                    f"resuming: no task of the job {job_id} of an earlier run has run for "
                    f"{stalled_after:.0f} s (no node?); its {left} unfinished tasks' calls run "
                    "in this run"
                )
                return
            if not said:
                log(
                    f"resuming: the job {job_id} of an earlier run of these calls still has "
                    f"{left} tasks to run; waiting for them, then taking their results"
                )
                said = True
            sleep(poll_interval)


def _items(calls: Any) -> list[tuple[Any, Sequence[Any], dict[str, Any]]] | None:
    items = getattr(calls, "items", None)
    if not isinstance(items, list):
        return None
    return [(f, tuple(a), dict(k)) for f, a, k in items]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: Stands, in `StoredResults.values`, for a call with no stored result (yet).
MISSING: Any = _Missing()


@dataclass(frozen=True)
class StoredResults:
    """What the tasks of a resumable job stored, in the order its client sent the calls."""

    job_id: str
    #: The key of every call the job's tasks were given, in order.
    keys: list[str]
    #: Each call's result, or `MISSING` where none is stored (yet).
    values: list[Any]

    @property
    def finished(self) -> int:
        return sum(1 for v in self.values if v is not MISSING)


def stored_results(store: BlobStore, job_id: str, *, any_environment: bool = True) -> StoredResults:
    """The results the tasks of the resumable job ``job_id`` have stored, read without its
    script: the calls' keys come from the job's signed payloads (``jobs/{job_id}/``, kept
    until the job is cleaned up), each result is verified before it is unpickled.

    Calls the client never sent (it died first) are not known here; re-running the script
    with ``resume=True`` computes them.
    """
    key = job_key(results_key(store), job_id)
    tasks = sorted(
        {
            n.split("/")[3]
            for n in store.list_names(f"{job_prefix(job_id)}tasks/")
            if n.endswith("/payload")
        }
    )
    if not tasks:
        raise FileNotFoundError(
            f"no payload of the job {job_id} is stored: it is not a resumable job of this "
            "container, or its blobs were cleaned up"
        )
    keys: list[str] = []
    for task_id in tasks:
        data = store.download(payload_blob(job_id, task_id))
        keys.extend(task_keys(data, key, job_id=job_id, task_id=task_id))
    # A task sent again with fresh URLs has a second payload with the same calls.
    keys = list(dict.fromkeys(keys))
    resumer = Resumer(
        store, image="", any_environment=any_environment, sas_expiry=3600.0, cache=True
    )
    try:
        found = resumer.stored(keys)
    finally:
        resumer.close()
    values = [MISSING if f is None else f[0] for f in found]
    return StoredResults(job_id=job_id, keys=keys, values=values)

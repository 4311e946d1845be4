"""What clients that died left in the account, found without touching anyone's live run.

A client that ends normally, or by Ctrl-C, SIGTERM or SIGHUP, removes its job, its blobs
and (if it was the last user of a pool the library created) the pool. After a SIGKILL, a
lost machine or a power cut nothing ran, so `joblib-azurebatch cleanup` finds the rest:

- **jobs** with this library's id whose client is gone (:func:`liveness.client_gone`: its
  process has exited, on this host; its heartbeat is stale, from another host), and jobs
  that already ended (completed). A job whose client may be alive is never touched; a job
  with no client record (made by an older version) is only reported.
- **blobs** under ``jobs/{job_id}/`` of every job that is not a live run (also folders whose
  job is already gone).
- **pools** that the library created to be deleted when idle (their metadata says so) and
  that no live run uses once the jobs above are gone. Pools created by the user or with
  ``keep_pool=True`` are left alone.

The job of a resumable run (``resume=True``) whose client is gone is spared, with its
blobs and its pool: its tasks still run and store their calls' results, and the same
script run again waits for them and takes those results (:mod:`joblib_azurebatch.resume`).
It goes only when asked (``resumable_after``: when it is at least that old). The stored
results themselves (``results/``) are never leftovers.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .batch import JobInfo, PoolInfo
from .errors import AzureBatchError
from .liveness import STALE_AFTER, ClientRecord, client_gone
from .payload import job_prefix
from .pools import library_pool, live_users
from .resume import RESUME_METADATA

if TYPE_CHECKING:
    from .service import BatchApi
    from .storage import BlobStore

__all__ = ["Leftovers", "find_leftovers", "is_library_job", "remove_leftovers"]

#: The tail of the ids ``BatchConfig.new_job_id`` makes: ``-{UTC time}-{8 hex}``.
_LIBRARY_JOB_ID = re.compile(r"-(\d{8}T\d{6})-[0-9a-f]{8}$")


#: Seconds a job folder without a job is spared (a run stores blobs before its job exists).
YOUNG_FOLDER = 3600.0


def _age(job_id: str, now: _dt.datetime) -> float:
    """Seconds since the job id was made (its UTC stamp); 0 when it has none."""
    match = _LIBRARY_JOB_ID.search(job_id)
    if match is None:
        return 0.0
    made = _dt.datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=_dt.timezone.utc)
    return (now - made).total_seconds()


def is_library_job(job_id: str) -> bool:
    """Whether a job id has the shape of the ids ``BatchConfig.new_job_id`` makes."""
    return _LIBRARY_JOB_ID.search(job_id) is not None


@dataclass
class Leftovers:
    """What :func:`find_leftovers` found, each with why it may go."""

    jobs: list[tuple[JobInfo, str]] = field(default_factory=list)
    #: Job folders in the container (``jobs/{id}/``) whose job is not a live run.
    blob_prefixes: list[str] = field(default_factory=list)
    pools: list[tuple[PoolInfo, str]] = field(default_factory=list)
    #: Jobs kept because their client may be alive, and why.
    live: list[tuple[JobInfo, str]] = field(default_factory=list)
    #: Library-shaped jobs with no client record: reported, not removed.
    unrecorded: list[JobInfo] = field(default_factory=list)
    #: Jobs of resumable runs whose client is gone, kept for a re-run, and why.
    resumable: list[tuple[JobInfo, str]] = field(default_factory=list)


def find_leftovers(
    service: BatchApi,
    store: BlobStore | None,
    *,
    stale_after: float = STALE_AFTER,
    resumable_after: float | None = None,
) -> Leftovers:
    """Look through the account; removes nothing (see :func:`remove_leftovers`).

    ``resumable_after``: seconds after which the job of a resumable run whose client is
    gone goes too (None: never).
    """
    found = Leftovers()
    now = _dt.datetime.now(_dt.timezone.utc)
    jobs = service.list_jobs()
    known = {j.job_id for j in jobs}
    live_ids: set[str] = set()
    for job in jobs:
        if not is_library_job(job.job_id):
            live_ids.add(job.job_id)
            continue
        if job.state == "deleting":
            continue
        if job.state == "completed":
            found.jobs.append((job, "it has ended"))
            continue
        record = ClientRecord.from_metadata(job.metadata)
        if record is None:
            found.unrecorded.append(job)
            live_ids.add(job.job_id)
            continue
        gone = client_gone(record, stale_after=stale_after)
        if gone is None:
            found.live.append((job, f"its client {record.host} (pid {record.pid}) is alive"))
            live_ids.add(job.job_id)
        elif RESUME_METADATA in job.metadata and (
            resumable_after is None or _age(job.job_id, now) < resumable_after
        ):
            found.resumable.append(
                (job, f"{gone}, but it is resumable: run its script again to take its results")
            )
            live_ids.add(job.job_id)
        else:
            found.jobs.append((job, gone))
    if store is not None:
        try:
            names = store.list_names("jobs/")
        except FileNotFoundError:
            names = []
        folders = sorted({n.split("/")[1] for n in names if n.count("/") >= 2})
        # A run stores its first payload before it creates its job, and may wait minutes
        # for a quota before the job exists: a young folder without a job is left alone.
        leaving_ids = {j.job_id for j, _ in found.jobs}
        found.blob_prefixes = [
            job_prefix(j)
            for j in folders
            if j in leaving_ids
            or (
                j not in live_ids
                and j not in known
                and _age(j, now) >= max(stale_after, YOUNG_FOLDER)
            )
        ]
    leaving = {j.job_id for j, _ in found.jobs}
    for pool in service.list_pools():
        if not library_pool(pool.metadata) or pool.state == "deleting":
            continue
        users = live_users(
            [j for j in jobs if j.pool_id == pool.pool_id and j.job_id not in leaving]
        )
        kept = [j for j, _ in found.resumable if j.pool_id == pool.pool_id]
        if not users and not kept:
            found.pools.append((pool, "the library created it and no live run uses it"))
    return found


def remove_leftovers(
    service: BatchApi,
    store: BlobStore | None,
    found: Leftovers,
    *,
    report: Callable[[str], None] = lambda line: None,
) -> tuple[int, int, int]:
    """Delete what :func:`find_leftovers` found: jobs first (they bill), then blobs, then
    pools. Returns ``(jobs, blobs, pools)`` removed. One failure does not stop the rest."""
    jobs = blobs = pools = 0
    for job, why in found.jobs:
        try:
            service.delete_job(job.job_id)
            jobs += 1
            report(f"deleted job {job.job_id}: {why}")
        except AzureBatchError as e:
            report(f"could not delete job {job.job_id}: {e}")
    if store is not None:
        for prefix in found.blob_prefixes:
            try:
                count = store.delete_prefix(prefix)
                blobs += count
                report(f"deleted {count} blobs under {store.container}/{prefix}")
            except (AzureBatchError, OSError) as e:
                report(f"could not delete the blobs under {prefix}: {e}")
    for pool, why in found.pools:
        # Looked at again just before: a run may have started on it since the listing.
        if live_users(service.list_jobs(pool_id=pool.pool_id)):
            report(f"kept pool {pool.pool_id}: a run started on it meanwhile")
            continue
        try:
            service.delete_pool(pool.pool_id)
            pools += 1
            report(f"deleted pool {pool.pool_id}: {why}")
        except AzureBatchError as e:
            report(f"could not delete pool {pool.pool_id}: {e}")
    return jobs, blobs, pools

"""Who may delete a pool, when several processes use it, against the in-memory fake.

Each ``PoolRegistry`` stands for one process; the fake account is shared between them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest

from joblib_azurebatch.leftovers import find_leftovers, remove_leftovers
from joblib_azurebatch.liveness import ClientRecord
from joblib_azurebatch.pools import AUTO_DELETE, CREATOR, PoolRegistry
from tests.fakes import FakeBatch, FakeClock, pool_spec

URL = "https://acct.region.batch.azure.com"


@pytest.fixture
def batch() -> FakeBatch:
    return FakeBatch(FakeClock())


def live_metadata() -> dict[str, str]:
    return ClientRecord.of_this_process().to_metadata()


def dead_metadata() -> dict[str, str]:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    record = ClientRecord.of_this_process()
    return replace(record, pid=child.pid, process_started=1.0).to_metadata()


def test_a_created_pool_records_its_creator_and_autoscales_to_idle(batch):
    lease = PoolRegistry().acquire(batch, pool_spec("p"), account_url=URL, keep=False)
    assert lease.created
    assert lease.auto_delete
    spec = batch.pools["p"].spec
    assert spec.metadata[CREATOR].startswith(f"{socket.gethostname()}/{os.getpid()}/")
    assert spec.metadata[AUTO_DELETE] == "true"
    assert spec.autoscale_formula
    assert "$TargetDedicatedNodes" in spec.autoscale_formula


def test_a_kept_pool_has_fixed_size_and_is_never_deleted(batch):
    first = PoolRegistry()
    lease = first.acquire(batch, pool_spec("p"), account_url=URL, keep=True)
    assert batch.pools["p"].spec.autoscale_formula is None
    assert batch.pools["p"].spec.metadata[AUTO_DELETE] == "false"
    first.release(lease)
    other = PoolRegistry()
    other.release(other.acquire(batch, pool_spec("p"), account_url=URL, keep=False))
    assert batch.deleted_pools == []


def test_the_first_process_to_finish_leaves_the_pool_to_the_others(batch):
    one, two, three = PoolRegistry(), PoolRegistry(), PoolRegistry()
    leases = []
    for n, registry in enumerate((one, two, three)):
        leases.append(registry.acquire(batch, pool_spec("p"), account_url=URL, keep=False))
        batch.create_job(f"job-{n}", "p", metadata=live_metadata())
    assert [lease.created for lease in leases] == [True, False, False]
    # The two processes that did not create the pool woke it (a fresh idle formula).
    assert batch.calls["enable_autoscale"] == 2
    for n, registry in enumerate((one, two)):
        batch.delete_job(f"job-{n}")
        registry.release(leases[n])
        assert batch.deleted_pools == [], f"process {n} deleted a pool still in use"
    batch.delete_job("job-2")
    three.release(leases[2])
    assert batch.deleted_pools == ["p"]


def test_a_dead_clients_job_does_not_keep_the_pool_alive(batch):
    registry = PoolRegistry()
    lease = registry.acquire(batch, pool_spec("p"), account_url=URL, keep=False)
    batch.create_job("orphan", "p", metadata=dead_metadata())
    registry.release(lease)
    assert batch.deleted_pools == ["p"]


def test_a_job_without_a_client_record_counts_as_a_user(batch):
    registry = PoolRegistry()
    lease = registry.acquire(batch, pool_spec("p"), account_url=URL, keep=False)
    batch.create_job("someone-elses", "p")
    registry.release(lease)
    assert batch.deleted_pools == []


def test_a_users_own_pool_is_never_deleted(batch):
    batch.add_pool(pool_spec("mine"))
    registry = PoolRegistry()
    registry.release(registry.acquire(batch, pool_spec("mine"), account_url=URL, keep=False))
    assert batch.deleted_pools == []
    assert batch.calls["enable_autoscale"] == 0


JOB = "joblib-20260101T000000-0123abcd"
OTHER = "joblib-20260101T000000-4567ef01"
ENDED = "joblib-20260101T000000-89abcdef"


def test_cleanup_removes_a_dead_clients_job_and_pool_and_never_a_live_run(batch):
    registry = PoolRegistry()
    registry.acquire(batch, pool_spec("dead-pool"), account_url=URL, keep=False)
    registry.acquire(batch, pool_spec("live-pool"), account_url=URL, keep=False)
    batch.create_job(JOB, "dead-pool", metadata=dead_metadata())
    batch.create_job(OTHER, "live-pool", metadata=live_metadata())
    batch.create_job(ENDED, "live-pool", metadata=dead_metadata())
    batch.terminate_job(ENDED, "done")
    batch.create_job("not-ours", "live-pool")

    found = find_leftovers(batch, None)
    assert sorted(j.job_id for j, _ in found.jobs) == sorted([JOB, ENDED])
    assert [j.job_id for j, _ in found.live] == [OTHER]
    assert [p.pool_id for p, _ in found.pools] == ["dead-pool"]
    lines: list[str] = []
    assert remove_leftovers(batch, None, found, report=lines.append) == (2, 0, 1)
    assert OTHER in batch.jobs
    assert "not-ours" in batch.jobs
    assert batch.deleted_pools == ["dead-pool"]
    assert any("has exited" in line for line in lines)


def test_cleanup_spares_a_resumable_run_and_its_pool_unless_asked(batch):
    """A resumable run's job keeps running its tasks (and storing their results) after its
    client died; a re-run of its script waits for them, so cleanup leaves it and its pool
    until it is older than what the user allows."""
    from joblib_azurebatch.resume import RESUME_METADATA

    registry = PoolRegistry()
    registry.acquire(batch, pool_spec("resumable-pool"), account_url=URL, keep=False)
    batch.create_job(JOB, "resumable-pool", metadata={**dead_metadata(), RESUME_METADATA: "k"})

    found = find_leftovers(batch, None)
    assert [j.job_id for j, _ in found.resumable] == [JOB]
    assert found.jobs == []
    assert found.pools == []

    # JOB's id says it was made in 2026-01: "older than an hour" takes it, and its pool.
    found = find_leftovers(batch, None, resumable_after=3600)
    assert [j.job_id for j, _ in found.jobs] == [JOB]
    assert [p.pool_id for p, _ in found.pools] == ["resumable-pool"]
    assert found.resumable == []


def test_a_kept_pool_drains_when_idle_only_if_asked(batch):
    registry = PoolRegistry()
    registry.acquire(batch, pool_spec("kept"), account_url=URL, keep=True, idle_minutes=30)
    formula = batch.pools["kept"].spec.autoscale_formula
    assert formula is not None
    assert "30 * TimeInterval_Minute" in formula
    assert batch.pools["kept"].spec.metadata[AUTO_DELETE] == "false"


def test_a_collected_backend_never_waits_for_a_run_creating_a_pool(monkeypatch):
    """The garbage collector may finalize a backend in any thread, including the thread of
    an in-process HTTP server that a run holding the registry's lock waits for (the local
    account's emulator): closing its clients must not wait for that lock there."""
    import threading
    import time

    from joblib_azurebatch import backend
    from joblib_azurebatch.run import Account

    registry = PoolRegistry()
    monkeypatch.setattr(backend, "POOLS", registry)
    closed = threading.Event()

    class Client:
        def close(self) -> None:
            closed.set()

    account = Account(cfg=None, service=Client(), store=Client())  # type: ignore[arg-type]
    with registry._lock:
        # A run creating a pool holds the lock; a finalizer runs meanwhile.
        finalizer = threading.Thread(target=backend._close_accounts, args=({0: account},))
        started = time.monotonic()
        finalizer.start()
        finalizer.join(5)
        assert not finalizer.is_alive()
        assert time.monotonic() - started < 1.0
        assert not closed.is_set()  # closing waits for the lock, in a thread of its own
    assert closed.wait(5)

"""The watchdog: a job or pool that went away fails the pending calls instead of a hang.

Driven against the in-memory fake Batch account and a fake clock, so that "30 s later" and
"15 minutes without a node" take no time.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest

from joblib_azurebatch.errors import CredentialError, RunLostError, ServiceError
from joblib_azurebatch.liveness import ClientRecord
from joblib_azurebatch.watch import Watchdog
from tests.fakes import FakeBatch, FakeClock, pool_spec


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def batch(clock) -> FakeBatch:
    b = FakeBatch(clock)
    b.add_pool(pool_spec("pool"))
    b.create_job("job", "pool")
    return b


def watchdog(batch, clock, **kw) -> Watchdog:
    return Watchdog(batch, job_id="job", pool_id="pool", clock=clock, interval=30.0, **kw)


def test_nothing_wrong_gives_nothing_and_looks_once_per_interval(batch, clock):
    dog = watchdog(batch, clock)
    for _ in range(10):
        clock.advance(10)
        assert dog(pending=True) is None
    # 100 s at one look per 30 s: three looks, each a job read and a pool read.
    assert dog.looks == 3
    assert batch.calls["get_job"] == 3
    assert batch.calls["pool_status"] == 3


def test_no_look_while_nothing_is_pending(batch, clock):
    dog = watchdog(batch, clock)
    clock.advance(100)
    assert dog(pending=False) is None
    assert dog.looks == 0


def test_a_job_deleted_from_outside(batch, clock):
    dog = watchdog(batch, clock)
    batch.delete_job("job")
    clock.advance(31)
    error = dog(pending=True)
    assert isinstance(error, RunLostError)
    assert error.error_code == "JobDeleted"
    assert "job was deleted" in str(error) or "was deleted" in str(error)


def test_a_job_terminated_from_outside_names_the_reason(batch, clock):
    dog = watchdog(batch, clock)
    batch.terminate_job("job", "stopped by the admin")
    clock.advance(31)
    error = dog(pending=True)
    assert isinstance(error, RunLostError)
    assert error.error_code == "JobTerminated"
    assert "stopped by the admin" in str(error)


def test_the_runs_own_ending_is_not_news(batch, clock):
    ending = False
    dog = watchdog(batch, clock, ending=lambda: ending)
    ending = True
    batch.terminate_job("job", "joblib-azurebatch: the Parallel call ended")
    clock.advance(31)
    assert dog(pending=True) is None


def test_a_pool_deleted_from_outside(batch, clock):
    dog = watchdog(batch, clock)
    batch.delete_pool("pool")
    clock.advance(31)
    error = dog(pending=True)
    assert isinstance(error, RunLostError)
    assert error.error_code == "PoolDeleted"
    assert "pool" in str(error)


def test_a_pool_resized_to_zero_fails_only_after_the_capacity_timeout(batch, clock):
    dog = watchdog(batch, clock, capacity_timeout=600.0)
    pool = batch.pools["pool"]
    pool.spec = replace(pool.spec, dedicated_nodes=0, spot_nodes=0)
    clock.advance(31)
    assert dog(pending=True) is None  # the first look without capacity starts the wait
    clock.advance(300)
    assert dog(pending=True) is None
    clock.advance(301)
    error = dog(pending=True)
    assert isinstance(error, RunLostError)
    assert error.error_code == "NoCapacity"
    assert "resized to zero" in str(error)
    assert "capacity_timeout" in str(error)


def test_capacity_that_comes_back_resets_the_wait(batch, clock):
    dog = watchdog(batch, clock, capacity_timeout=600.0)
    pool = batch.pools["pool"]
    full = pool.spec
    pool.spec = replace(full, dedicated_nodes=0)
    clock.advance(31)
    dog(pending=True)
    clock.advance(500)
    pool.spec = full  # a spot node came back
    assert dog(pending=True) is None
    pool.spec = replace(full, dedicated_nodes=0)
    clock.advance(500)
    assert dog(pending=True) is None  # 500 s since it went again, not 1000


def test_a_failed_look_is_skipped_not_fatal(batch, clock):
    dog = watchdog(batch, clock)
    batch.fail("get_job", ServiceError("503 Server Busy", 503, "ServerBusy"), times=3)
    for _ in range(3):
        clock.advance(31)
        assert dog(pending=True) is None
    batch.delete_job("job")
    clock.advance(31)
    assert isinstance(dog(pending=True), RunLostError)


def test_a_refused_credential_is_not_swallowed(batch, clock):
    dog = watchdog(batch, clock)
    batch.fail("get_job", CredentialError("key rotated", 403, "AuthenticationFailed"))
    clock.advance(31)
    with pytest.raises(CredentialError):
        dog(pending=True)


def test_the_heartbeat_refreshes_the_client_record_at_its_own_rate(batch, clock):
    now = ClientRecord.of_this_process()
    record = replace(now, heartbeat=now.heartbeat - dt.timedelta(hours=1))
    dog = watchdog(batch, clock, record=record, heartbeat_every=60.0)
    for _ in range(12):
        clock.advance(10)
        dog(pending=False)  # beats go on while nothing is pending
    assert dog.beats == 2
    stored = ClientRecord.from_metadata(batch.job_metadata["job"])
    assert stored is not None
    assert stored.pid == record.pid
    assert stored.heartbeat > record.heartbeat + dt.timedelta(minutes=59)

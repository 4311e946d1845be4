"""Creating a run's job against the emulator: a lost reply and a reached job quota cost time,
not the run, and a quota that stays reached ends in an error that says what to do."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator

import pytest
from azure.batch import BatchClient

from joblib_azurebatch import batch
from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.errors import QuotaError

POOL = "create-job-pool"  # a job may name a pool that does not exist (yet)
QUOTA = "ActiveJobAndScheduleQuotaReached"


@pytest.fixture
def service(local: LocalBatch, monkeypatch: pytest.MonkeyPatch) -> Iterator[BatchService]:
    # Quota waits of a tenth of a second, and a budget of two seconds.
    monkeypatch.setattr(batch, "QUOTA_WAIT_FIRST", 0.1)
    monkeypatch.setattr(batch, "QUOTA_WAIT_MAX", 0.2)
    svc = BatchService.from_config(local.config(retry_budget=2.0))
    try:
        yield svc
    finally:
        local.emulator.faults.clear()
        svc.close()


def _job_id() -> str:
    return f"create-{uuid.uuid4().hex[:8]}"


def _statuses(local: LocalBatch, before: int) -> list[int]:
    return [r.status for r in local.emulator.requests("Jobs_CreateJob")[before:]]


def test_a_lost_reply_is_resent_and_job_exists_is_success(
    local: LocalBatch, service: BatchService, batch_client: BatchClient
) -> None:
    job_id = _job_id()
    before = len(local.emulator.requests("Jobs_CreateJob"))
    local.emulator.fail_after_commit("Jobs_CreateJob", status=500)
    service.create_job(job_id, POOL, metadata={"joblib-azurebatch-run": "r1"})
    # The job was made, its answer lost; the resend met it.
    assert _statuses(local, before) == [500, 409]
    job = batch_client.get_job(job_id)
    assert job.pool_info.pool_id == POOL
    assert {m.name: m.value for m in job.metadata or ()} == {"joblib-azurebatch-run": "r1"}


def test_a_reached_job_quota_is_waited_out(
    local: LocalBatch,
    service: BatchService,
    batch_client: BatchClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_id = _job_id()
    before = len(local.emulator.requests("Jobs_CreateJob"))
    local.emulator.fail("Jobs_CreateJob", status=409, code=QUOTA, times=2)
    with caplog.at_level(logging.WARNING, logger="joblib_azurebatch.batch"):
        service.create_job(job_id, POOL)
    assert _statuses(local, before) == [409, 409, 201]
    assert batch_client.get_job(job_id).id == job_id
    waits = [r.getMessage() for r in caplog.records if r.name == "joblib_azurebatch.batch"]
    assert len(waits) == 2  # one line per wait
    for line in waits:
        assert f"has reached its quota of active jobs and job schedules ({QUOTA})" in line
        assert re.search(rf"waiting 0\.\d s before trying to create the job {job_id} on", line)


def test_a_job_quota_that_stays_reached_is_a_quota_error_naming_it(
    local: LocalBatch, service: BatchService
) -> None:
    job_id = _job_id()
    before = len(local.emulator.requests("Jobs_CreateJob"))
    local.emulator.fail("Jobs_CreateJob", status=409, code=QUOTA, times=1000)
    with pytest.raises(QuotaError) as info:
        service.create_job(job_id, POOL)
    error = info.value
    assert (error.status_code, error.error_code) == (409, QUOTA)
    assert error.operation == f"create the job {job_id} on the pool {POOL}"
    text = str(error)
    assert f"quota of active jobs and job schedules ({QUOTA})" in text
    assert "retry_budget is 2 s" in text
    assert "joblib-azurebatch cleanup" in text
    assert "higher quota" in text
    # Waits of 0.05-0.2 s for two seconds: a dozen attempts or so, then no job.
    attempts = _statuses(local, before)
    assert set(attempts) == {409}
    assert 5 <= len(attempts) <= 40
    assert job_id not in {j.job_id for j in service.list_jobs()}

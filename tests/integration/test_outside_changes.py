"""Someone else deletes, terminates or shrinks what a run uses: the call fails, never hangs.

Batch leaves a job's tasks ``active`` forever when their pool goes away, so without the
run's watchdog each of these would wait until the caller's own timeout (or forever). The
changes are made with the real SDK, the way the portal or the az CLI would make them.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import threading
import time

import cloudpickle
import joblib
import pytest
from azure.batch import models as m
from azure.batch.models._models import BatchJobTerminateOptions
from azure.core.exceptions import ResourceNotFoundError
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch import RunLostError
from tests.helpers.waiting import wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slow(x):
    time.sleep(30)
    return x


def job_of(batch_client, prefix: str) -> str | None:
    for job in batch_client.list_jobs():
        if job.id.startswith(prefix) and str(job.state).lower().endswith("active"):
            return str(job.id)
    return None


def run_and_change(local, batch_client, change, **fields) -> tuple[RunLostError, float]:
    """Start 4 slow calls, apply ``change(job_id, pool_id)`` once they run, and return the
    error the call raised and the seconds it took after the change."""
    name = f"outside-{secrets.token_hex(3)}"
    cfg = local.config(pool_id=name, job_id=name, watch_interval=0.5, **fields)
    changed: list[float] = []

    def outsider() -> None:
        job_id = wait_for("the job", lambda: job_of(batch_client, name), timeout=60)
        wait_for("running tasks", lambda: local.emulator.process_ids(), timeout=60)
        change(job_id, name)
        changed.append(time.monotonic())

    thread = threading.Thread(target=outsider, daemon=True)
    thread.start()
    try:
        with (
            joblib.parallel_config(backend="azurebatch", config=cfg),
            pytest.raises(RunLostError) as info,
        ):
            Parallel(n_jobs=-1, batch_size=1, timeout=120)(delayed(slow)(x) for x in range(4))
    finally:
        thread.join(60)
        with contextlib.suppress(ResourceNotFoundError):  # most tests delete it already
            batch_client.begin_delete_pool(name, polling_interval=1).result()
    return info.value, time.monotonic() - changed[0]


def test_a_job_deleted_from_outside(local, batch_client):
    error, seconds = run_and_change(
        local,
        batch_client,
        lambda job_id, pool_id: batch_client.begin_delete_job(job_id, polling_interval=1),
    )
    assert error.error_code == "JobDeleted"
    assert seconds < 20


def test_a_job_terminated_from_outside(local, batch_client):
    error, seconds = run_and_change(
        local,
        batch_client,
        lambda job_id, pool_id: batch_client.begin_terminate_job(
            job_id,
            BatchJobTerminateOptions(termination_reason="by the admin"),
            polling_interval=1,
        ),
    )
    assert error.error_code == "JobTerminated"
    assert "by the admin" in str(error)
    assert seconds < 20


def test_a_pool_deleted_from_outside(local, batch_client):
    error, seconds = run_and_change(
        local,
        batch_client,
        lambda job_id, pool_id: batch_client.begin_delete_pool(pool_id, polling_interval=1),
    )
    assert error.error_code == "PoolDeleted"
    assert seconds < 20


def test_a_pool_resized_to_zero_fails_after_the_capacity_timeout(local, batch_client):
    def shrink(job_id: str, pool_id: str) -> None:
        batch_client.begin_resize_pool(
            pool_id,
            m.BatchPoolResizeOptions(target_dedicated_nodes=0, target_low_priority_nodes=0),
            polling_interval=1,
        )

    # A kept pool has fixed counts (no autoscale formula), so it can be resized.
    error, seconds = run_and_change(
        local, batch_client, shrink, keep_pool=True, capacity_timeout=3.0
    )
    assert error.error_code == "NoCapacity"
    assert "resized to zero" in str(error)
    assert seconds < 30

"""A busy account throttles some requests of every kind: the run still returns every result.

The emulator answers a random fifth of all Batch requests (pool, job, task submission,
task counts, listings, deletion) with 429 and ``Retry-After: 1``, as an account under load
does, and the blob proxy in front of Azurite a fifth of all blob requests (the client's and
the nodes') with 503 ``ServerBusy``; the backend and the workers wait as asked and retry,
and the Parallel call neither fails nor loses or duplicates a result.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator

import cloudpickle
import joblib
import pytest
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch.emulator import LocalBatch

# The worker runs in another process that cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def cube(x):
    return x**3


def test_a_fifth_of_all_requests_throttled_costs_time_not_results(local):
    emu = local.emulator
    name = f"throttled-{secrets.token_hex(3)}"
    cfg = local.config(pool_id=name, job_id=name)
    seen = len(emu.requests())
    emu.throttle_share(0.2, status=429, retry_after=1, times=500, seed=7)
    try:
        with joblib.parallel_config(backend="azurebatch", config=cfg):
            out = Parallel(n_jobs=-1, batch_size=1)(delayed(cube)(x) for x in range(40))
    finally:
        emu.faults.clear()
    assert out == [x**3 for x in range(40)]
    during = emu.requests()[seen:]
    throttled = [r for r in during if r.fault == "injected 429"]
    assert throttled, "no request was throttled"
    assert all(r.status == 429 for r in throttled)


@pytest.fixture(scope="module")
def busy() -> Iterator[LocalBatch]:
    """A local account whose blob endpoint is the fault-injecting proxy in front of Azurite."""
    with LocalBatch(nodes=2, slots_per_node=2, blob_faults=True) as running:
        yield running


def test_a_fifth_of_batch_and_blob_requests_throttled_costs_time_not_results(busy):
    emu, blobs = busy.emulator, busy.blob_faults
    name = f"throttled-{secrets.token_hex(3)}"
    cfg = busy.config(pool_id=name, job_id=name)
    seen_batch, seen_blobs = len(emu.requests()), len(blobs.requests())
    emu.throttle_share(0.2, status=429, retry_after=1, times=500, seed=11)
    blobs.throttle_share(0.2, status=503, retry_after=1, times=500, seed=12)
    try:
        with joblib.parallel_config(backend="azurebatch", config=cfg):
            out = Parallel(n_jobs=-1, batch_size=1)(delayed(cube)(x) for x in range(40))
    finally:
        emu.faults.clear()
        blobs.faults.clear()
    assert out == [x**3 for x in range(40)]
    assert [r for r in emu.requests()[seen_batch:] if r.fault == "injected 429"]
    refused = [r for r in blobs.requests()[seen_blobs:] if r.fault == "injected 503"]
    assert all(r.status == 503 for r in refused)
    # Both sides were refused and waited: the client (Shared Key: payloads, results) and
    # the workers on the nodes (SAS URLs: payloads down, results up).
    assert {r.auth for r in refused} >= {"SharedKey", "SAS"}
    assert {r.operation_id for r in refused} >= {"PutBlob", "GetBlob"}

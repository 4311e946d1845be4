"""A busy account throttles some requests of every kind: the run still returns every result.

The emulator answers a random fifth of all Batch requests (pool, job, task submission,
task counts, listings, deletion) with 429 and ``Retry-After: 1``, as an account under load
does; the backend waits as asked and retries, and the Parallel call neither fails nor
loses or duplicates a result.
"""

from __future__ import annotations

import secrets
import sys

import cloudpickle
import joblib
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)

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

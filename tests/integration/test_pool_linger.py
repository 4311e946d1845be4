"""A pool the library created lingers for the next run of the process (``pool_linger``),
so a loop of short ``Parallel`` calls creates it once; it goes when the time is up, or at
once when the process exits."""

from __future__ import annotations

import multiprocessing
import secrets
import signal
import sys
import time

import cloudpickle
import joblib
import pytest
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch.pools import POOLS

# The worker runs in another process that cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def double(x: int) -> int:
    return 2 * x


def double_in_a_worker(cfg) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        assert Parallel(n_jobs=-1)(delayed(double)(i) for i in range(4)) == [0, 2, 4, 6]
    # A worker keeps no handler for the pool it leaves lingering: its pool's terminate
    # must end it by default (see shutdown.release).
    assert signal.getsignal(signal.SIGTERM) is before


def pool_exists(batch_client, pool_id: str) -> bool:
    return any(p.id == pool_id for p in batch_client.list_pools())


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def name() -> str:
    return f"linger-{secrets.token_hex(3)}"


def test_a_loop_of_parallel_calls_creates_the_pool_once_and_exit_deletes_it(
    local, batch_client, name
):
    cfg = local.config(pool_id=name, job_id=name, pool_linger=600.0)
    before = local.emulator.counters.copy()
    for round_ in range(3):
        # A new backend each time, as a loop of `with parallel_config(...)` blocks makes.
        with joblib.parallel_config(backend="azurebatch", config=cfg):
            out = Parallel(n_jobs=-1)(delayed(double)(i + round_) for i in range(4))
        assert out == [2 * (i + round_) for i in range(4)]
        assert pool_exists(batch_client, name)  # kept for the next call
    used = local.emulator.counters.copy()
    used.subtract(before)
    assert used["Pools_CreatePool"] == 1, dict(used)
    assert used["Pools_DeletePool"] == 0
    POOLS.flush()  # what the process does at exit (and on SIGTERM / SIGHUP)
    assert wait_until(lambda: not pool_exists(batch_client, name))


def test_a_lingering_pool_is_deleted_when_its_time_is_up(local, batch_client, name):
    cfg = local.config(pool_id=name, job_id=name, pool_linger=1.0)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        assert Parallel(n_jobs=-1)(delayed(double)(i) for i in range(4)) == [0, 2, 4, 6]
    assert pool_exists(batch_client, name)
    assert wait_until(lambda: not pool_exists(batch_client, name))


def test_a_lingering_pool_deleted_from_outside_is_created_again(local, batch_client, name):
    cfg = local.config(pool_id=name, job_id=name, pool_linger=600.0)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        assert Parallel(n_jobs=-1)(delayed(double)(i) for i in range(4)) == [0, 2, 4, 6]
    batch_client.begin_delete_pool(name, polling_interval=0.2).result()
    assert wait_until(lambda: not pool_exists(batch_client, name))
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        assert Parallel(n_jobs=-1)(delayed(double)(i) for i in range(4)) == [0, 2, 4, 6]
    assert pool_exists(batch_client, name)
    POOLS.flush()
    assert wait_until(lambda: not pool_exists(batch_client, name))


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_multiprocessing_worker_deletes_the_pool_it_left_lingering_when_it_ends(
    local, batch_client, name
):
    """A worker ends through os._exit (no atexit, and its linger timer dies with it): the
    pool it left lingering goes at its end all the same, not 600 s later or never."""
    cfg = local.config(pool_id=name, job_id=name, pool_linger=600.0)
    # Forked: the config (which holds keys and is never pickled) is inherited, not sent.
    worker = multiprocessing.get_context("fork").Process(target=double_in_a_worker, args=(cfg,))
    worker.start()
    try:
        worker.join(120)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
    assert wait_until(lambda: not pool_exists(batch_client, name))

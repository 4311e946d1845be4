"""Pool and job lifecycle: what is created, what is left behind, and how a run stops.

Tasks that must not outlive an abort write marker files into a temporary folder (the
emulator's tasks are local processes, so they share the file system with the test).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import secrets
import sys
import time
from pathlib import Path

import cloudpickle
import joblib
import pytest
from azure.core.exceptions import ResourceNotFoundError
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch import PoolDifferenceWarning

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x):
    return x * x


def marked(x, folder, *, fail_on=None, delay=5.0):
    Path(folder, f"started-{x}").touch()
    if x == fail_on:
        raise RuntimeError(f"call {x} failed")
    time.sleep(delay)
    Path(folder, f"done-{x}").touch()
    return x


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


@pytest.fixture
def cfg(local, request):
    name = unique(request.node.name.replace("_", "-")[5:25].strip("-"))
    return local.config(pool_id=name, job_id=name)


def wait_until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def jobs_left(batch_client, prefix: str) -> list[str]:
    return [j.id for j in batch_client.list_jobs() if j.id.startswith(prefix + "-")]


def pool_left(batch_client, pool_id: str) -> bool:
    try:
        batch_client.get_pool(pool_id)
    except ResourceNotFoundError:
        return False
    return True


def blobs_left(blob_service, cfg) -> list[str]:
    container = blob_service.get_container_client(cfg.container)
    return [b.name for b in container.list_blobs(name_starts_with=f"jobs/{cfg.job_id}-")]


def assert_nothing_left(batch_client, blob_service, cfg) -> None:
    assert wait_until(lambda: not jobs_left(batch_client, cfg.job_id))
    assert wait_until(lambda: not pool_left(batch_client, cfg.pool_id))
    assert blobs_left(blob_service, cfg) == []


def test_a_run_leaves_no_job_pool_or_blob(cfg, batch_client, blob_service):
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        assert Parallel(n_jobs=-1)(delayed(square)(x) for x in range(8)) == [
            x * x for x in range(8)
        ]
    assert_nothing_left(batch_client, blob_service, cfg)


def test_keep_flags_leave_what_was_asked(cfg, batch_client, blob_service):
    cfg = cfg.replace(keep_pool=True, keep_job=True, keep_blobs=True)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        Parallel(n_jobs=-1)(delayed(square)(x) for x in range(4))
    try:
        (job_id,) = jobs_left(batch_client, cfg.job_id)
        job = batch_client.get_job(job_id)
        assert str(job.state).lower().endswith("completed")  # terminated, kept
        assert pool_left(batch_client, cfg.pool_id)
        names = blobs_left(blob_service, cfg)
        assert any(n.endswith("/result") for n in names)
        assert any(n.endswith("/payload") for n in names)
    finally:
        for job_id in jobs_left(batch_client, cfg.job_id):
            batch_client.begin_delete_job(job_id, polling_interval=1).result()
        batch_client.begin_delete_pool(cfg.pool_id, polling_interval=1).result()
        container = blob_service.get_container_client(cfg.container)
        for name in blobs_left(blob_service, cfg):
            container.delete_blob(name)


def test_an_existing_pool_is_used_as_is_and_never_deleted(cfg, batch_client):
    with joblib.parallel_config(backend="azurebatch", config=cfg.replace(keep_pool=True)):
        Parallel(n_jobs=2)(delayed(square)(x) for x in range(2))
    try:
        other = cfg.replace(task_slots_per_node=3)  # not what the pool has
        with (
            joblib.parallel_config(backend="azurebatch", config=other),
            pytest.warns(PoolDifferenceWarning, match="3 task slots|task slots per node") as seen,
        ):
            assert Parallel(n_jobs=2)(delayed(square)(x) for x in range(3)) == [0, 1, 4]
        # The warning names the caller's line, not a line inside joblib or this package.
        (warning,) = [w for w in seen if issubclass(w.category, PoolDifferenceWarning)]
        assert warning.filename == __file__
        pool = batch_client.get_pool(cfg.pool_id)
        assert pool.task_slots_per_node == cfg.task_slots_per_node
        assert not str(pool.state).lower().endswith("deleting")
    finally:
        batch_client.begin_delete_pool(cfg.pool_id, polling_interval=1).result()


def test_timeout_raises_and_stops_the_tasks(cfg, batch_client, blob_service, tmp_path):
    start = time.monotonic()
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        # joblib raises multiprocessing's TimeoutError, whatever the backend.
        pytest.raises(multiprocessing.TimeoutError),
    ):
        Parallel(n_jobs=-1, timeout=1.5, batch_size=1)(
            delayed(marked)(x, str(tmp_path), delay=4.0) for x in range(4)
        )
    assert time.monotonic() - start < 8
    assert_nothing_left(batch_client, blob_service, cfg)
    time.sleep(max(0.0, start + 5.0 - time.monotonic()))
    assert list(tmp_path.glob("done-*")) == []


def test_first_error_aborts_the_other_tasks(cfg, batch_client, blob_service, tmp_path):
    start = time.monotonic()
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(RuntimeError, match="call 0 failed"),
    ):
        Parallel(n_jobs=-1, batch_size=1)(
            delayed(marked)(x, str(tmp_path), fail_on=0, delay=5.0) for x in range(8)
        )
    assert time.monotonic() - start < 5
    assert_nothing_left(batch_client, blob_service, cfg)
    time.sleep(max(0.0, start + 6.5 - time.monotonic()))
    assert list(tmp_path.glob("started-*")) != []
    assert list(tmp_path.glob("done-*")) == []


def interrupted(n: int):
    for i in range(n):
        yield delayed(square)(i)
    raise KeyboardInterrupt


def test_ctrl_c_from_the_input_generator_cleans_up(cfg, batch_client, blob_service):
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(KeyboardInterrupt),
    ):
        Parallel(n_jobs=-1, batch_size=1)(interrupted(6))
    assert_nothing_left(batch_client, blob_service, cfg)


def test_an_exception_in_the_caller_cleans_up(cfg, batch_client, blob_service, tmp_path):
    def consume_and_fail() -> None:
        gen = Parallel(n_jobs=-1, batch_size=1, return_as="generator")(
            delayed(marked)(x, str(tmp_path), delay=0.0 if x == 0 else 4.0) for x in range(8)
        )
        for _ in gen:
            raise RuntimeError("the caller failed")

    def fail_then_collect() -> None:
        with contextlib.suppress(RuntimeError):
            consume_and_fail()
        gc.collect()

    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.warns(UserWarning, match="cancelled"),
    ):
        fail_then_collect()
    assert_nothing_left(batch_client, blob_service, cfg)
    assert (tmp_path / "done-0").exists()

"""Several client processes on one pool, and clients that die: nothing hangs or stays.

The default ``pool_id`` is shared by everyone on an account, so concurrent clients on one
pool are the normal case. Each client here is its own process running an ordinary script
(tests/helpers/clients.py); the account is the session's local one.
"""

from __future__ import annotations

import io
import secrets
import signal
import time

from azure.core.exceptions import ResourceNotFoundError

from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.cli import cleanup
from joblib_azurebatch.pools import CREATOR, PoolRegistry
from tests.helpers.clients import client_env, start_client
from tests.helpers.waiting import wait_for


def pool_gone(batch_client, pool_id: str) -> bool:
    try:
        pool = batch_client.get_pool(pool_id)
    except ResourceNotFoundError:
        return True
    return str(pool.state).lower().endswith("deleting")


def jobs_of(batch_client, prefix: str) -> list[str]:
    return [
        j.id
        for j in batch_client.list_jobs()
        if j.id.startswith(prefix) and not str(j.state).lower().endswith("deleting")
    ]


def blobs_of(blob_service, prefix: str) -> list[str]:
    container = blob_service.get_container_client("joblib-azurebatch")
    return [b.name for b in container.list_blobs(name_starts_with=f"jobs/{prefix}")]


def test_three_processes_on_one_pool_all_finish_and_leave_nothing(
    local, batch_client, blob_service, tmp_path
):
    name = f"shared-{secrets.token_hex(3)}"
    clients = [
        start_client(
            tmp_path, client_env(local, pool_id=name, job_id=f"{name}-{n}"), calls=8, seconds=1.0
        )
        for n in range(3)
    ]
    started = time.monotonic()
    outputs = [c.communicate(timeout=240) for c in clients]
    wall = time.monotonic() - started
    for client, (out, err) in zip(clients, outputs, strict=True):
        assert client.returncode == 0, err[-3000:]
        assert out.startswith("OK"), out
    # The last to finish deleted the pool; every job and blob of every client is gone.
    wait_for("the pool deleted", lambda: pool_gone(batch_client, name), timeout=15)
    wait_for("the jobs deleted", lambda: not jobs_of(batch_client, name), timeout=15)
    assert blobs_of(blob_service, name) == []
    print(
        f"three clients on one pool: {wall:.1f} s wall, each {[o.split()[1] for o, _ in outputs]}"
    )


def test_a_create_whose_reply_was_lost_still_makes_its_sender_the_creator(local, batch_client):
    """The resend gets PoolExists; the pool's metadata says it is still this client's."""
    cfg = local.config(pool_id=f"lostreply-{secrets.token_hex(3)}")
    local.emulator.fail_after_commit("Pools_CreatePool", times=1)
    svc = BatchService.from_config(cfg)
    registry = PoolRegistry()
    try:
        from joblib_azurebatch.batch import PoolSpec

        lease = registry.acquire(
            svc, PoolSpec.from_config(cfg), account_url=str(cfg.batch_url), keep=False
        )
        assert lease.created
        assert lease.auto_delete
        pool = svc.get_pool(cfg.pool_id)
        assert pool is not None
        assert pool.metadata[CREATOR]
        registry.release(lease)
        wait_for("the pool deleted", lambda: pool_gone(batch_client, cfg.pool_id), timeout=15)
    finally:
        local.emulator.faults.clear()
        svc.delete_pool(cfg.pool_id)
        svc.close()


def running_tasks(local) -> int:
    return len(local.emulator.process_ids())


def running_tasks_of(batch_client, prefix: str) -> int:
    return sum(
        1
        for job in jobs_of(batch_client, prefix)
        for task in batch_client.list_tasks(job)
        if str(task.state).lower().endswith("running")
    )


def test_sigterm_cleans_up_like_ctrl_c(local, batch_client, blob_service, tmp_path):
    name = f"sigterm-{secrets.token_hex(3)}"
    client = start_client(
        tmp_path, client_env(local, pool_id=name, job_id=name), calls=8, seconds=60.0
    )
    wait_for("running tasks", lambda: running_tasks(local) > 0, timeout=60)
    sent = time.monotonic()
    client.send_signal(signal.SIGTERM)
    _, err = client.communicate(timeout=60)
    exited = time.monotonic() - sent
    # It ends as the signal would: killed by SIGTERM, after one line saying what it cancels.
    assert client.returncode == -signal.SIGTERM, err[-3000:]
    assert "SIGTERM: cancelling the Batch job" in err
    wait_for("no running task", lambda: running_tasks(local) == 0, timeout=30)
    idle = time.monotonic() - sent
    assert not jobs_of(batch_client, name)
    assert blobs_of(blob_service, name) == []
    wait_for("the pool deleted", lambda: pool_gone(batch_client, name), timeout=15)
    print(f"SIGTERM: exited after {exited:.1f} s, nothing running after {idle:.1f} s")


def test_sigterm_while_waiting_for_the_pool_cleans_up(local, batch_client, tmp_path):
    """The first minutes of a run on Azure are the wait for nodes: SIGTERM there too."""
    name = f"sigwait-{secrets.token_hex(3)}"
    executor = local.emulator.executor
    delay, executor.allocation_delay = executor.allocation_delay, 60.0
    try:
        client = start_client(
            tmp_path, client_env(local, pool_id=name, job_id=name), calls=4, seconds=1.0
        )
        # The job exists before the wait (it marks the pool as in use), the nodes do not.
        wait_for("the job", lambda: jobs_of(batch_client, name), timeout=60)
        time.sleep(1.0)
        client.send_signal(signal.SIGTERM)
        _, err = client.communicate(timeout=60)
    finally:
        executor.allocation_delay = delay
    assert client.returncode == -signal.SIGTERM, err[-3000:]
    wait_for("the job deleted", lambda: not jobs_of(batch_client, name), timeout=30)
    wait_for("the pool deleted", lambda: pool_gone(batch_client, name), timeout=30)


def test_after_sigkill_cleanup_removes_what_was_left_and_spares_a_live_run(
    local, batch_client, blob_service, tmp_path
):
    dead_name = f"sigkill-{secrets.token_hex(3)}"
    live_name = f"alive-{secrets.token_hex(3)}"
    dead = start_client(
        tmp_path, client_env(local, pool_id=dead_name, job_id=dead_name), calls=4, seconds=60.0
    )
    live = start_client(
        tmp_path, client_env(local, pool_id=live_name, job_id=live_name), calls=4, seconds=3.0
    )
    try:
        # Its own tasks running (not just any: the live client runs too), so that its
        # payloads were stored: the job is created before the first batch is stored.
        wait_for(
            "the doomed client running",
            lambda: running_tasks_of(batch_client, dead_name) > 0,
            timeout=60,
        )
        wait_for("the live client's job", lambda: jobs_of(batch_client, live_name), timeout=60)
        dead.kill()
        dead.wait(timeout=10)
        # Nothing of the dead client's could run its clean-up: its job and tasks are still there.
        assert jobs_of(batch_client, dead_name)
        killed = time.monotonic()
        out = io.StringIO()
        cfg = local.config()
        jobs, blobs, pools = cleanup(cfg, dry_run=False, out=out)
        report = out.getvalue()
        assert f"deleted job {jobs_of_prefix(report, dead_name)}" in report
        assert "has exited" in report
        assert f"deleted pool {dead_name}" in report
        assert live_name not in report.replace(f"kept job {live_name}", "")
        assert blobs > 0
        wait_for("the dead job deleted", lambda: not jobs_of(batch_client, dead_name), timeout=30)
        wait_for("the dead pool deleted", lambda: pool_gone(batch_client, dead_name), timeout=30)
        assert blobs_of(blob_service, dead_name) == []
        print(
            f"SIGKILL + cleanup: {jobs} jobs, {blobs} blobs, {pools} pools removed in "
            f"{time.monotonic() - killed:.1f} s"
        )
        # The live client was not touched and finishes with its results.
        out_live, err_live = live.communicate(timeout=120)
        assert live.returncode == 0, err_live[-3000:]
        assert out_live.startswith("OK")
    finally:
        for proc in (dead, live):
            if proc.poll() is None:
                proc.kill()


def jobs_of_prefix(report: str, prefix: str) -> str:
    for word in report.split():
        if word.startswith(prefix):
            return word.rstrip(":")
    raise AssertionError(f"no job of {prefix} in the report:\n{report}")

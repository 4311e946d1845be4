"""The worker against Azurite: real payloads, SAS URLs only, exit codes, the node cache."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from joblib._parallel_backends import SequentialBackend
from joblib.parallel import BatchedCalls

from joblib_azurebatch import payload, worker
from joblib_azurebatch.errors import CredentialError, VersionMismatchError
from joblib_azurebatch.payload import PayloadWriter, read_result
from joblib_azurebatch.storage import BlobStore, download_url

KEY = b"k" * 32
JOB = "job-w"


class WorkerError(Exception):
    pass


def raise_worker_error(x: int) -> None:
    raise WorkerError(f"no good: {x}")


def scaled_sum(X: np.ndarray, factor: float) -> float:
    return float(X.sum() * factor)


class _Marker:
    """Writes a file when unpickled: proof that something was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (_touch, (self.path, "x"))


def _touch(path: str, text: str) -> str:
    Path(path).write_text(text)
    return path


def _writer(store: BlobStore) -> PayloadWriter:
    return PayloadWriter(store, job_id=JOB, signing_key=KEY, inline_threshold=1024, sas_expiry=600)


def _batch(*calls: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> BatchedCalls:
    return BatchedCalls(list(calls), (SequentialBackend(), 1))


def _node_env(task: payload.PreparedTask, node: Path) -> dict[str, str]:
    """What Batch gives a task: its AZ_BATCH_* variables and its environment settings only."""
    node.mkdir(parents=True, exist_ok=True)
    return {
        "AZ_BATCH_NODE_SHARED_DIR": str(node / "shared"),
        "AZ_BATCH_TASK_ID": task.task_id,
        "AZ_BATCH_JOB_ID": JOB,
        "AZ_BATCH_TASK_WORKING_DIR": str(node / "wd"),
        **task.environment,
    }


def _result(store: BlobStore, task: payload.PreparedTask) -> payload.ResultEnvelope:
    return read_result(store.download(task.result_blob), KEY, job_id=JOB, task_id=task.task_id)


def _run(env: dict[str, str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = worker.main(env, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_runs_a_batch_with_a_shared_array_and_uploads_the_result(
    store: BlobStore, tmp_path: Path
) -> None:
    X = np.arange(20000.0)
    task = _writer(store).prepare("t1", _batch((scaled_sum, (X, 2.0), {}), (len, ([1, 2],), {})))
    env = _node_env(task, tmp_path)
    assert not any("KEY" in name and "SIGNING" not in name for name in env)
    code, out, err = _run(env)
    assert (code, err) == (0, "")
    result = _result(store, task)
    assert result.ok
    assert result.result() == [X.sum() * 2.0, 2]
    assert set(result.timings) == {"download", "load", "run"}
    assert "signature verified" in out
    assert "uploaded the result" in out
    assert "sig=" not in out  # SAS signatures never reach the log
    cached = tmp_path / "shared" / "joblib-azurebatch" / "objects" / task.objects[0]
    assert cached.is_file()


def test_second_task_on_the_node_reads_the_cache(store: BlobStore, tmp_path: Path) -> None:
    X = np.ones(5000)
    w = _writer(store)
    first = w.prepare("a", _batch((scaled_sum, (X, 1.0), {})))
    second = w.prepare("b", _batch((scaled_sum, (X, 3.0), {})))
    assert _run(_node_env(first, tmp_path))[0] == 0
    # The object is gone from storage: the second task can only succeed from the node cache.
    store.delete_prefix(f"jobs/{JOB}/objects/")
    code, out, _ = _run(_node_env(second, tmp_path))
    assert code == 0
    assert "0 downloaded, 1 from the node cache" in out
    assert _result(store, second).result() == [15000.0]


def test_a_new_node_without_the_object_fails_as_infrastructure(
    store: BlobStore, tmp_path: Path
) -> None:
    task = _writer(store).prepare("t", _batch((scaled_sum, (np.ones(5000), 1.0), {})))
    store.delete_prefix(f"jobs/{JOB}/objects/")
    code, _, err = _run(_node_env(task, tmp_path))
    assert code == worker.EXIT_OBJECT_FAILED
    assert "fetching a shared object failed" in err
    assert not store.exists(task.result_blob)


def test_concurrent_tasks_download_an_object_once(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    store.upload("obj", data)
    url = store.sas_url("obj", read=True, expiry=timedelta(minutes=5))
    caches = [worker.ObjectCache(tmp_path) for _ in range(6)]  # one per task process
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda cache: cache.get(sha, url), caches))
    assert all(g == data for g in got)
    assert sum(c.downloads for c in caches) == 1
    assert sum(c.hits for c in caches) == 5
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [sha]


def test_a_corrupt_cache_file_is_replaced(store: BlobStore, tmp_path: Path) -> None:
    data = b"object bytes" * 100
    sha = hashlib.sha256(data).hexdigest()
    store.upload("obj", data)
    (tmp_path / sha).write_bytes(b"truncated")
    cache = worker.ObjectCache(tmp_path)
    assert cache.get(sha, store.sas_url("obj", read=True, expiry=timedelta(minutes=5))) == data
    assert (tmp_path / sha).read_bytes() == data
    assert cache.downloads == 1


def test_unwritable_shared_dir_falls_back_to_a_temporary_folder(tmp_path: Path) -> None:
    shared = tmp_path / "readonly"
    shared.mkdir()
    shared.chmod(0o500)
    try:
        cache = worker.ObjectCache.for_node({"AZ_BATCH_NODE_SHARED_DIR": str(shared)})
    finally:
        shared.chmod(0o700)
    if os.geteuid() == 0:  # root writes anywhere: the node directory is used
        assert cache.directory == shared / "joblib-azurebatch" / "objects"
    else:
        assert not cache.directory.is_relative_to(shared)
    assert os.access(cache.directory, os.W_OK)


def test_user_exception_is_a_result_and_exit_0(store: BlobStore, tmp_path: Path) -> None:
    task = _writer(store).prepare("t", _batch((raise_worker_error, (3,), {})))
    code, out, err = _run(_node_env(task, tmp_path))
    assert (code, err) == (0, "")
    assert "raised WorkerError" in out
    with pytest.raises(WorkerError, match="no good: 3") as info:
        _result(store, task).result()
    assert "raise_worker_error" in str(info.value.__cause__)


def test_version_mismatch_is_reported_in_the_result(
    store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "unpickled"
    client = {**payload.versions(), "python": "3.99"}
    with monkeypatch.context() as patch:
        patch.setattr(payload, "versions", lambda: client)
        task = _writer(store).prepare("t", _batch((len, (_Marker(str(marker)),), {})))
    code, _, err = _run(_node_env(task, tmp_path))
    assert (code, err) == (0, "")
    assert not marker.exists()  # the calls were never unpickled
    with pytest.raises(VersionMismatchError, match=r"PYTHON_VERSION=3\.99"):
        _result(store, task).result()


def test_tampered_payload_exits_non_zero_and_unpickles_nothing(
    store: BlobStore, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    task = _writer(store).prepare("t", _batch((len, (_Marker(str(marker)),), {})))
    data = bytearray(store.download(task.payload_blob))
    data[-20] ^= 0xFF
    store.upload(task.payload_blob, bytes(data))
    code, _, err = _run(_node_env(task, tmp_path))
    assert code == worker.EXIT_UNVERIFIED
    assert "failed signature verification" in err
    assert not marker.exists()
    assert not store.exists(task.result_blob)
    # the untampered payload does unpickle the marker: the check above is meaningful
    good = _writer(store).prepare("u", _batch((len, (_Marker(str(marker)),), {})))
    assert _run(_node_env(good, tmp_path))[0] == 0
    assert marker.exists()


def test_payload_signed_with_another_key_is_refused(store: BlobStore, tmp_path: Path) -> None:
    task = _writer(store).prepare("t", _batch((len, ([1],), {})))
    env = {**_node_env(task, tmp_path), payload.SIGNING_KEY_ENV: (b"z" * 32).hex()}
    assert _run(env)[0] == worker.EXIT_UNVERIFIED


def test_another_tasks_payload_in_the_blob_is_refused(store: BlobStore, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    w = _writer(store)
    a = w.prepare("t-a", _batch((len, (_Marker(str(marker)),), {})))
    b = w.prepare("t-b", _batch((len, (_Marker(str(marker)),), {})))
    payload_a, payload_b = store.download(a.payload_blob), store.download(b.payload_blob)
    store.upload(a.payload_blob, payload_b)  # both verify: signed with the job's key
    store.upload(b.payload_blob, payload_a)
    code, _, err = _run(_node_env(a, tmp_path))
    assert code == worker.EXIT_WRONG_TASK
    assert "written for task t-b of job job-w, but this is task t-a of job job-w" in err
    assert not marker.exists()
    assert not store.exists(a.result_blob)


def test_an_expired_sas_url_is_refused_by_storage_and_reported(
    store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = PayloadWriter(store, job_id=JOB, signing_key=KEY, sas_expiry=1.0)
    task = w.prepare("t-late", _batch((len, ([1],), {})))
    env = _node_env(task, tmp_path)
    expiry = worker.url_expiry(env[payload.PAYLOAD_URL_ENV])
    assert expiry is not None
    while worker._now() <= expiry + timedelta(seconds=1):
        time.sleep(0.1)
    # An expired SAS URL gets 403: Azure Storage says AuthenticationFailed, Azurite 3.37
    # AuthorizationFailure, so the worker goes by the status and the URL's own expiry.
    with pytest.raises(CredentialError) as refused:
        download_url(env[payload.PAYLOAD_URL_ENV])
    assert refused.value.status_code == 403
    assert refused.value.error_code in {"AuthenticationFailed", "AuthorizationFailure"}
    # The worker does not even ask...
    code, _, err = _run(env)
    assert code == worker.EXIT_URLS_EXPIRED
    assert f"the task's URLs expired at {expiry:%Y-%m-%dT%H:%M:%SZ}" in err
    # ...and when it does (its clock behind the service's), it reads the refusal the same way.
    monkeypatch.setattr(worker, "_ensure_fresh", lambda *urls: None)
    code, _, err = _run(env)
    assert code == worker.EXIT_URLS_EXPIRED
    assert err.startswith("[joblib-azurebatch worker] error: the task's URLs expired at ")


@pytest.mark.parametrize(
    ("drop", "code"),
    [
        (payload.PAYLOAD_URL_ENV, worker.EXIT_BAD_ENVIRONMENT),
        (payload.SIGNING_KEY_ENV, worker.EXIT_BAD_ENVIRONMENT),
        # Batch sets both on every task; without them a swapped payload would pass.
        (worker.JOB_ID_ENV, worker.EXIT_BAD_ENVIRONMENT),
        (worker.TASK_ID_ENV, worker.EXIT_BAD_ENVIRONMENT),
    ],
)
def test_missing_environment_is_an_infrastructure_failure(
    store: BlobStore, tmp_path: Path, drop: str, code: int
) -> None:
    task = _writer(store).prepare("t", _batch((len, ([1],), {})))
    env = _node_env(task, tmp_path)
    del env[drop]
    got, _, err = _run(env)
    assert got == code
    assert drop in err


def test_missing_payload_and_refused_result_upload(store: BlobStore, tmp_path: Path) -> None:
    task = _writer(store).prepare("t", _batch((len, ([1],), {})))
    env = _node_env(task, tmp_path)
    read_only_result = store.sas_url(task.result_blob, read=True, expiry=timedelta(minutes=5))
    code, _, err = _run({**env, payload.RESULT_URL_ENV: read_only_result})
    assert code == worker.EXIT_UPLOAD_FAILED
    assert "uploading the result failed" in err
    assert "sig=" not in err
    store.delete_prefix(task.payload_blob)
    code, _, err = _run(env)
    assert code == worker.EXIT_DOWNLOAD_FAILED
    assert "does not exist" in err


def _run_module(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m joblib_azurebatch.worker`` in its own process, as a task runs it."""
    return subprocess.run(
        [sys.executable, "-m", "joblib_azurebatch.worker"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_runs_as_a_module(store: BlobStore, tmp_path: Path) -> None:
    task = _writer(store).prepare("t", _batch((sum, ([1, 2, 3],), {})))
    env = {"PATH": os.environ.get("PATH", ""), **_node_env(task, tmp_path)}
    done = _run_module(env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[joblib-azurebatch worker]" in done.stdout
    assert _result(store, task).result() == [6]
    done = _run_module({"PATH": env["PATH"]}, tmp_path)
    assert done.returncode == worker.EXIT_BAD_ENVIRONMENT
    assert "JOBLIB_AZUREBATCH_PAYLOAD_URL" in done.stderr


def test_prune_removes_what_no_task_used_for_a_week(tmp_path: Path) -> None:
    week = 7 * 86400
    old, fresh = tmp_path / ("a" * 64), tmp_path / ("b" * 64)
    stale_temp, live_temp = tmp_path / ".x.1.tmp", tmp_path / ".y.2.tmp"
    data = b"used object"
    used = tmp_path / hashlib.sha256(data).hexdigest()
    for path in (old, fresh, stale_temp, live_temp):
        path.write_bytes(b"-")
    used.write_bytes(data)
    long_ago = time.time() - week - 60
    for path in (old, used):
        os.utime(path, (long_ago, long_ago))
    os.utime(stale_temp, (time.time() - 7200, time.time() - 7200))
    cache = worker.ObjectCache(tmp_path)
    # A task reading `used` from the cache marks it as used now: it survives the prune.
    assert cache.get(used.name, "http://127.0.0.1:9/unused") == data
    assert cache.prune() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (fresh, used, live_temp)
    )


def exits(code: int) -> None:
    sys.exit(code)


def test_sys_exit_in_the_function_is_its_result(store: BlobStore, tmp_path: Path) -> None:
    task = _writer(store).prepare("t", _batch((exits, (3,), {})))
    code, _, err = _run(_node_env(task, tmp_path))
    assert (code, err) == (0, "")  # a deterministic exit is not retried by Batch
    with pytest.raises(SystemExit) as info:
        _result(store, task).result()
    assert info.value.code == 3


def interrupts() -> None:
    raise KeyboardInterrupt("raised by the function")


def test_keyboard_interrupt_in_the_function_is_its_result(store: BlobStore, tmp_path: Path) -> None:
    task = _writer(store).prepare("t", _batch((interrupts, (), {})))
    code, _, err = _run(_node_env(task, tmp_path))
    assert (code, err) == (0, "")
    with pytest.raises(KeyboardInterrupt, match="raised by the function"):
        _result(store, task).result()


def test_the_worker_ends_after_the_result_whatever_threads_the_function_left(
    store: BlobStore, tmp_path: Path
) -> None:
    def leaves_a_thread_behind(x: int) -> int:  # local: cloudpickle sends it by value
        import threading
        import time

        threading.Thread(target=time.sleep, args=(600,), daemon=False).start()
        return x + 1

    task = _writer(store).prepare("t-threads", _batch((leaves_a_thread_behind, (1,), {})))
    env = {"PATH": os.environ.get("PATH", ""), **_node_env(task, tmp_path)}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "joblib_azurebatch.worker"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60  # not the thread's 600 s
    assert "uploaded the result" in done.stdout  # flushed before the process ended
    assert _result(store, task).result() == [2]

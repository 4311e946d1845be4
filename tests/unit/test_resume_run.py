"""A resumable run driven by a real ``Parallel`` against the in-memory fakes: what it does
when a batch cannot be sent after the first, where joblib cannot be told by an exception.

The fake nodes run each task's `Memo` inside a task context over the in-memory container,
as the worker does, so that a first run stores its calls' records for the second.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import joblib
import pytest
from joblib import Parallel, delayed

import joblib_azurebatch.run as run_module
from joblib_azurebatch.errors import PayloadError, ServiceError
from joblib_azurebatch.memo import TaskContext, call_key, record_blob, task_context
from joblib_azurebatch.payload import encode_result, result_blob
from joblib_azurebatch.run import Account
from tests.fakes import FakeBatch
from tests.unit.test_dispatch_ahead import Container, FakeBackend, Nodes, make_config

N = 120


class Store(Container):
    """The container, with SAS URLs that name their blob."""

    def sas_url(self, name: str, *, read: bool = False, write: bool = False, expiry: Any) -> str:
        return f"memory://{name}"


def _blob(ref: str) -> str:
    return ref.removeprefix("memory://")


class MemoNodes(Nodes):
    """Nodes that run a task as the worker does: in a task context."""

    def run(self, job_id: str, task_id: str) -> None:
        calls, key = self._calls(job_id, task_id)

        def read(ref: str) -> bytes | None:
            try:
                return self.store.download(_blob(ref))
            except FileNotFoundError:
                return None

        def write(ref: str, data: bytes) -> None:
            self.store.upload(_blob(ref), data)

        context = TaskContext(job_id, task_id, key, read=read, write=write)
        value: Any = None
        error: BaseException | None = None
        with task_context(context):
            try:
                value = calls()
            except Exception as e:
                error = e
        result = encode_result(job_id=job_id, task_id=task_id, key=key, value=value, error=error)
        self.store.upload(result_blob(job_id, task_id), result)
        self.batch.complete(job_id, task_id, exit_code=0)


def square(x: int, extra: object = None) -> int:
    return x * x


@pytest.fixture
def account() -> Iterator[tuple[FakeBackend, Store]]:
    batch, store = FakeBatch(), Store()
    nodes = MemoNodes(batch, store)
    backend = FakeBackend(Account(cfg=make_config(resume=True), service=batch, store=store))
    halt = nodes.keep_running()
    yield backend, store
    halt()


def parallel(backend: FakeBackend, work: Callable[[], Any]) -> tuple[bool, dict[str, Any]]:
    """Run ``Parallel`` in a thread; returns (still running after 30 s, its outcome)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            with joblib.parallel_config(backend=backend):
                out["result"] = Parallel(n_jobs=-1)(work())
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(30)
    return thread.is_alive(), out


def test_an_unhashable_argument_in_a_later_batch_fails_the_call_instead_of_hanging(account):
    backend, _ = account
    hung, out = parallel(backend, lambda: (delayed(square)(i) for i in range(N)))
    assert out["result"] == [i * i for i in range(N)]
    lock = threading.Lock()

    def work() -> Iterator[Any]:
        for i in range(N):
            yield delayed(square)(i)
        yield delayed(square)(N, extra=lock)

    hung, out = parallel(backend, work)
    assert not hung
    assert isinstance(out.get("error"), PayloadError)
    assert "joblib.hash" in str(out["error"])


def test_a_run_that_cannot_start_after_stored_batches_fails_the_call(account, monkeypatch):
    """The re-run of a killed client: its first batches are answered from the store, so the
    job is created from a callback's thread, where a failure must still reach the caller."""
    backend, store = account
    hung, out = parallel(backend, lambda: (delayed(square)(i) for i in range(N)))
    assert out["result"] == [i * i for i in range(N)]
    for i in range(N - 30, N):
        del store.blobs[record_blob(call_key(square, (i,), {}))]
    threads: list[str] = []

    def refused(self: Any, first: Any, calls: Any) -> None:
        threads.append(threading.current_thread().name)
        raise ServiceError("the job quota is reached", 409, "ActiveJobAndScheduleQuotaReached")

    monkeypatch.setattr(run_module.JobRun, "_start", refused)
    hung, out = parallel(backend, lambda: (delayed(square)(i) for i in range(N)))
    assert not hung
    assert isinstance(out.get("error"), ServiceError)
    assert threads
    assert threads[0].startswith("azurebatch-resumed")

"""A child forked from a client (a multiprocessing pool inside a ``parallel_config`` block)
starts with nothing of its parent's: no runs, leases, queued deletions, clients or held locks.

Each test sets up some state in this process, forks, checks in the child what the child
would do with it, and reads the child's answer back through a pipe.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest

from joblib_azurebatch import run as run_mod
from joblib_azurebatch import shutdown
from joblib_azurebatch.backend import AzureBatchBackend
from joblib_azurebatch.emulator import azurite as azurite_module
from joblib_azurebatch.forks import ForkSafeLock
from joblib_azurebatch.pools import POOLS
from joblib_azurebatch.sweeper import SWEEPER
from tests.fakes import FakeBatch, FakeClock, pool_spec
from tests.unit.test_backend_sizing import config

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="there is no fork on this platform"),
    # Python 3.12+ warns that forking a process with threads may deadlock the child: what
    # these tests check is that it does not.
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning"),
]

URL = "https://acct.region.batch.azure.com"
CHILD_TIMEOUT = 15.0


def in_child(check: Callable[[], Any]) -> Any:
    """``check()`` run in a forked child; its value, or AssertionError if it hung or raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's side, reported through the pipe
        try:
            os.close(read)
            try:
                answer: tuple[str, Any] = ("value", check())
            except BaseException as e:
                answer = ("raised", repr(e))
            os.write(write, pickle.dumps(answer))
        finally:
            os._exit(0)
    os.close(write)
    data = b""
    deadline = time.monotonic() + CHILD_TIMEOUT
    try:
        while True:
            ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the forked child hung for {CHILD_TIMEOUT:g} s")
            chunk = os.read(read, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    assert kind == "value", f"the forked child raised {value}"
    return value


@contextmanager
def held_by_a_thread(lock: AbstractContextManager[Any]) -> Iterator[None]:
    """``lock`` held by another thread of this process for the whole block, as a fork
    finds it when some thread is inside it."""
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        yield
    finally:
        done.set()
        holder.join()


class StubRun:
    """Stands in for a JobRun of the parent: records what is done to it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.job_id = "parent-job"

    def abort(self, *, why: str = "") -> None:
        self.calls.append("abort")

    def close(self) -> None:
        self.calls.append("close")


@pytest.fixture
def parent_run() -> Iterator[StubRun]:
    stub = StubRun()
    run_mod._LIVE_RUNS.add(stub)  # type: ignore[arg-type]
    yield stub
    run_mod._LIVE_RUNS.discard(stub)  # type: ignore[arg-type]


def test_a_child_terminated_aborts_none_of_its_parents_runs(parent_run: StubRun) -> None:
    def terminated() -> list[str]:
        run_mod.close_live_runs(why="SIGTERM")  # what the child's SIGTERM handler does
        return parent_run.calls

    assert in_child(terminated) == []
    assert parent_run in run_mod.live_runs()  # type: ignore[comparison-overlap]


def test_a_child_neither_waits_for_nor_deletes_the_pool_its_parent_keeps() -> None:
    batch = FakeBatch(FakeClock())
    lease = POOLS.acquire(batch, pool_spec("lingering"), account_url=URL, keep=False)
    POOLS.release(lease, linger=300)  # left for the parent's next run

    def flushed() -> str | None:
        POOLS.flush()  # what the child does at exit or on SIGTERM
        pool = batch.get_pool("lingering")
        return pool.state if pool is not None else None

    try:
        # A parent thread creating a pool at the moment of the fork.
        with held_by_a_thread(POOLS._lock):
            assert in_child(flushed) == "active"
    finally:
        POOLS.flush()
    deleted = batch.get_pool("lingering")  # the parent's own exit still deletes it
    assert deleted is not None
    assert deleted.state == "deleting"


class SlowStore:
    """A store whose deletions wait for ``release``; records the names it was asked for."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.deleted: list[str] = []

    def delete_blobs(self, names: Sequence[str]) -> int:
        self.release.wait(30)
        self.deleted.extend(names)
        return len(names)

    def delete_prefix(self, prefix: str) -> int:
        return 0


def test_a_child_neither_deletes_nor_waits_for_its_parents_queued_blobs() -> None:
    store = SlowStore()
    SWEEPER.discard(store, ["jobs/parent/a"])
    deadline = time.monotonic() + 5
    while SWEEPER.threads == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    SWEEPER.discard(store, ["jobs/parent/b"])  # queued behind the busy thread
    try:

        def waited() -> tuple[bool, list[str]]:
            return SWEEPER.wait(5), store.deleted

        idle, deleted = in_child(waited)
        assert idle is True
        assert deleted == []
    finally:
        store.release.set()
    assert SWEEPER.wait(10)
    assert sorted(store.deleted) == ["jobs/parent/a", "jobs/parent/b"]


def test_a_backend_inherited_by_a_child_makes_the_child_its_own_clients() -> None:
    backend = AzureBatchBackend(config=config())
    parent = backend._account()

    def clients() -> tuple[bool, bool]:
        child = backend._account()
        return child.service is parent.service, child.store is parent.store

    assert in_child(clients) == (False, False)
    assert backend._account() is parent  # the parent's are untouched


@pytest.mark.parametrize("order", [("library", "azurite"), ("azurite", "library")])
def test_a_child_gets_back_the_handler_found_before_the_library_and_azurite(
    order: tuple[str, str],
) -> None:
    def application_handler(signum: int, frame: object) -> None:
        pass

    def chain_then_fork() -> tuple[bool, bool]:
        # In a child of this process, so that the chain is built afresh and left behind.
        signal.signal(signal.SIGTERM, application_handler)
        for who in order:
            if who == "library":
                assert shutdown.install(run_mod.close_live_runs)  # a run of the process
            else:
                azurite_module._install_signal_handlers()  # a LocalBatch started
        assert signal.getsignal(signal.SIGTERM) in (shutdown._handle, azurite_module._on_signal)

        def grandchild() -> tuple[bool, bool]:
            restored = signal.getsignal(signal.SIGTERM) is application_handler
            shutdown.install(run_mod.close_live_runs)  # the forked child's own first run
            return restored, signal.getsignal(signal.SIGTERM) is shutdown._handle

        return in_child(grandchild)

    assert in_child(chain_then_fork) == (True, True)


def test_a_module_lock_held_by_a_parent_thread_is_free_in_the_child() -> None:
    lock = ForkSafeLock()

    def take() -> bool:
        with lock:
            return True

    with held_by_a_thread(lock):
        assert in_child(take) is True

"""Slots kept busy and the pool checked once per context: real joblib, in-memory Batch.

The backend runs real ``Parallel`` calls against :class:`~tests.fakes.FakeBatch` and an
in-memory blob container. :class:`Nodes` stands in for the pool: it runs the tasks the run
added (decoding their payloads with the job's key, as the worker does) only when the test
says so, so a test can look at what is in flight between two completions.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import joblib
import pytest
from joblib import Parallel, delayed

from joblib_azurebatch.backend import AzureBatchBackend
from joblib_azurebatch.batch import PoolInfo
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.errors import RunLostError
from joblib_azurebatch.payload import (
    decode_task,
    encode_result,
    load_calls,
    object_blob,
    payload_blob,
    result_blob,
)
from joblib_azurebatch.pools import AUTO_DELETE, CREATOR, POOLS, ForgetOnLoss, PoolCheck
from joblib_azurebatch.run import Account, live_runs
from joblib_azurebatch.sizing import BatchSizer
from tests.fakes import FakeBatch, MemoryStore

KEY = "a2V5"  # base64 of "key": the config only checks the form
SLOTS = 4  # 2 nodes x 2 slots


def triple(x: int) -> int:
    return 3 * x


class Container(MemoryStore):
    """The blob container of the account, counting the checks that it exists."""

    def __init__(self) -> None:
        super().__init__()
        self.container_checks = 0

    def ensure_container(self) -> None:
        self.container_checks += 1

    def download(self, name: str) -> bytes:
        with self.lock:
            if name not in self.blobs:
                raise FileNotFoundError(name)
            return self.blobs[name]

    def delete_prefix(self, prefix: str) -> int:
        with self.lock:
            gone = [n for n in self.blobs if n.startswith(prefix)]
        return self.delete_blobs(gone)

    def delete_blobs(self, names: Sequence[str]) -> int:
        with self.lock:
            gone = [n for n in names if self.blobs.pop(n, None) is not None]
        return len(gone)


class Nodes:
    """Runs the tasks of the account's jobs in this process, as the worker would."""

    def __init__(self, batch: FakeBatch, store: Container) -> None:
        self.batch = batch
        self.store = store
        #: Calls per task, by task id, as the payloads hold them.
        self.sizes: dict[str, int] = {}

    def pending(self) -> list[tuple[str, str]]:
        """(job, task) of every task added and not completed, in the order added."""
        with self.batch._lock:
            return [
                (job.job_id, task.task_id)
                for job in self.batch.jobs.values()
                for task in job.tasks.values()
                if task.state != "completed"
            ]

    def sent(self, job_id: str) -> int:
        """Calls in every task the job has been given so far."""
        with self.batch._lock:
            tasks = list(self.batch.jobs[job_id].tasks)
        return sum(self.size_of(job_id, task_id) for task_id in tasks)

    def _calls(self, job_id: str, task_id: str) -> tuple[Any, bytes]:
        (run,) = [r for r in live_runs() if r.job_id == job_id]
        key = run._key
        envelope = decode_task(self.store.download(payload_blob(job_id, task_id)), key)
        calls = load_calls(envelope, lambda sha: self.store.download(object_blob(job_id, sha)))
        return calls, key

    def size_of(self, job_id: str, task_id: str) -> int:
        if task_id not in self.sizes:
            calls, _ = self._calls(job_id, task_id)
            self.sizes[task_id] = len(calls)
        return self.sizes[task_id]

    def run(self, job_id: str, task_id: str) -> None:
        calls, key = self._calls(job_id, task_id)
        self.sizes[task_id] = len(calls)
        result = encode_result(
            job_id=job_id, task_id=task_id, key=key, value=calls(), timings={"run": 0.01}
        )
        self.store.upload(result_blob(job_id, task_id), result)
        self.batch.complete(job_id, task_id, exit_code=0)

    def run_all(self) -> None:
        live = {r.job_id for r in live_runs()}
        for job_id, task_id in self.pending():
            if job_id in live:
                self.run(job_id, task_id)

    def keep_running(self) -> Callable[[], None]:
        """Run every task as soon as it is added, in a thread; returns what stops it."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                self.run_all()
                time.sleep(0.002)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join(5)

        return halt


class FakeBackend(AzureBatchBackend):
    """The backend, with the account's clients replaced by the in-memory ones."""

    def __init__(self, account: Account, **kwargs: Any) -> None:
        super().__init__(config=account.cfg, **kwargs)
        self.fake = account

    def _account(self) -> Account:
        return self.fake


def make_config(**changes: Any) -> BatchConfig:
    fields: dict[str, Any] = {
        "batch_url": "http://127.0.0.1:9",
        "batch_account": "acct",
        "batch_key": KEY,
        "storage_url": "http://127.0.0.1:9/devstoreaccount1",
        "storage_account": "devstoreaccount1",
        "storage_key": KEY,
        "image": "example.azurecr.io/worker:1",
        "dedicated_nodes": 2,
        "task_slots_per_node": 2,
        "pool_id": f"p-{uuid.uuid4().hex[:8]}",
        "keep_pool": True,
        "poll_interval": 0.005,
        "progress": False,
    }
    fields.update(changes)
    return BatchConfig(**fields)


@pytest.fixture
def batch() -> FakeBatch:
    return FakeBatch()


@pytest.fixture
def store() -> Container:
    return Container()


@pytest.fixture
def nodes(batch: FakeBatch, store: Container) -> Nodes:
    return Nodes(batch, store)


def backend_for(batch: FakeBatch, store: Container, **changes: Any) -> FakeBackend:
    cfg = make_config(**changes)
    return FakeBackend(Account(cfg=cfg, service=batch, store=store))  # type: ignore[arg-type]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def settled(read: Callable[[], Any], quiet: float = 0.15, timeout: float = 10.0) -> Any:
    """``read()`` once it has not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "never settled"
        time.sleep(0.005)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return last


class Call:
    """A Parallel call in a thread of its own, since it returns only once all tasks ran."""

    def __init__(self, backend: AzureBatchBackend, work: Callable[[], Any], **parallel: Any):
        self.result: Any = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                with joblib.parallel_config(backend=backend):
                    self.result = Parallel(n_jobs=-1, **parallel)(work())
            except BaseException as e:  # shown by the test that joins
                self.error = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the Parallel call did not return"
        if self.error is not None:
            raise self.error
        return self.result


# ---------------------------------------------------------------------- sizing


def test_in_flight_target_is_a_running_and_a_queued_task_per_slot() -> None:
    assert BatchSizer(n_jobs=4, min_duration=2, max_duration=60).in_flight_target() == 8
    sizer = BatchSizer(n_jobs=4, min_duration=2, max_duration=60, queued_per_slot=0)
    assert sizer.in_flight_target() == 4


def test_first_size_spreads_the_known_calls_over_the_free_places() -> None:
    sizer = BatchSizer(n_jobs=4, min_duration=2, max_duration=60, first_max=100)
    assert sizer.first_size(remaining=40, in_flight=0) == 5  # 8 places, two per slot
    assert sizer.first_size(remaining=32, in_flight=4) == 8  # the 4 queued places
    # Never fewer places than slots: joblib cuts a pull into one batch per slot.
    assert sizer.first_size(remaining=32, in_flight=7) == 8
    assert sizer.first_size(remaining=3, in_flight=0) == 1
    assert sizer.first_size(remaining=10_000, in_flight=0) == 100  # first_max
    assert sizer.size == 100  # learned sizes grow from the largest first batch


# ---------------------------------------------------------------------- first wave


def test_the_first_wave_of_a_known_number_of_calls_spreads_them_over_the_slots(batch, store, nodes):
    backend = backend_for(batch, store)
    call = Call(backend, lambda: [delayed(triple)(x) for x in range(40)])
    # Before any task ran, all 40 calls are out: a running and a queued task per slot.
    # joblib's pre_dispatch alone would send 8 calls in 4 tasks and wait.
    wait_for(lambda: len(nodes.pending()) >= 2 * SLOTS)
    first = settled(nodes.pending)
    sizes = [nodes.size_of(job, task) for job, task in first]
    assert len(first) == 2 * SLOTS
    assert sum(sizes) == 40
    assert max(sizes) <= 40 // SLOTS  # no slot is given more than its share in one task
    nodes.run_all()
    assert call.join() == [3 * x for x in range(40)]


def test_a_generator_starts_with_one_call_per_task_on_every_slot(batch, store, nodes):
    backend = backend_for(batch, store)
    call = Call(backend, lambda: (delayed(triple)(x) for x in range(40)))
    wait_for(lambda: len(nodes.pending()) >= 2 * SLOTS)
    first = settled(nodes.pending)
    assert [nodes.size_of(job, task) for job, task in first] == [1] * (2 * SLOTS)
    halt = nodes.keep_running()
    try:
        assert call.join() == [3 * x for x in range(40)]
    finally:
        halt()


# ---------------------------------------------------------------------- in flight


def test_dispatch_keeps_a_running_and_a_queued_task_per_slot_while_calls_remain(
    batch, store, nodes
):
    backend = backend_for(batch, store)
    # pre_dispatch="n_jobs": joblib alone keeps one task per slot, none queued.
    call = Call(backend, lambda: (delayed(triple)(x) for x in range(60)), pre_dispatch="n_jobs")
    wait_for(lambda: len(nodes.pending()) >= 2 * SLOTS)
    seen = []
    while True:
        pending = settled(nodes.pending)
        if not pending:
            break
        job, task = pending[0]
        seen.append((len(pending), nodes.sent(job)))
        nodes.run(job, task)  # one slot finishes its task
    assert call.join() == [3 * x for x in range(60)]
    # Until the last calls were sent, every slot had a task and one waiting behind it.
    before_the_end = [n for n, sent in seen if sent < 60]
    assert before_the_end, seen
    assert all(n == 2 * SLOTS for n in before_the_end), seen


# ---------------------------------------------------------------------- pool check


def test_ten_parallel_calls_in_one_context_read_the_pool_once(batch, store, nodes):
    backend = backend_for(batch, store)
    halt = nodes.keep_running()
    try:
        with joblib.parallel_config(backend=backend):
            for i in range(10):
                out = Parallel(n_jobs=-1)(delayed(triple)(x) for x in range(4 * i, 4 * i + 4))
                assert out == [3 * x for x in range(4 * i, 4 * i + 4)]
    finally:
        halt()
    # The first call reads the pool, creates it and waits for a slot; the nine others
    # trust that check (the pool is kept, so no run of the library deletes it).
    assert batch.calls["get_pool"] == 1
    assert batch.calls["ensure_pool"] == 1
    assert batch.calls["wait_for_capacity"] == 1
    assert store.container_checks == 1
    assert batch.calls["create_job"] == 10


def three_calls(backend: FakeBackend, nodes: Nodes) -> None:
    """Three ``Parallel`` calls in a row under one config, as a loop of them makes."""
    halt = nodes.keep_running()
    try:
        with joblib.parallel_config(backend=backend):
            for _ in range(3):
                assert Parallel(n_jobs=-1)(delayed(triple)(x) for x in range(4)) == [0, 3, 6, 9]
    finally:
        halt()


def test_a_pool_the_library_may_delete_is_read_by_every_call(batch, store, nodes):
    backend = backend_for(batch, store, keep_pool=False, pool_linger=0.0)
    three_calls(backend, nodes)
    # Each run deleted the pool it created; the next one found it gone and made it again.
    assert batch.calls["get_pool"] == 3
    assert batch.calls["wait_for_capacity"] == 3
    assert len(batch.deleted_pools) == 3


def pool_info(pool_id: str = "p", *, metadata: dict[str, str] | None = None) -> PoolInfo:
    return PoolInfo(
        pool_id=pool_id,
        state="active",
        allocation_state="steady",
        vm_size="standard_d2s_v3",
        target_dedicated_nodes=2,
        target_spot_nodes=0,
        current_dedicated_nodes=2,
        current_spot_nodes=0,
        task_slots_per_node=2,
        node_states={"idle": 2},
        metadata=metadata or {},
    )


def test_a_pool_check_holds_for_a_while_and_only_for_its_pool() -> None:
    now = [100.0]
    check = PoolCheck(seconds=60.0, clock=lambda: now[0])
    assert check.fresh("p") is None
    check.record(pool_info("p"))
    assert check.fresh("p") is not None
    assert check.fresh("other") is None
    now[0] += 59.0
    assert check.fresh("p") is not None
    now[0] += 2.0
    assert check.fresh("p") is None  # expired: the next run reads the pool again
    library = {CREATOR: "host/1/abc", AUTO_DELETE: "true"}
    check.record(pool_info("p", metadata=library))
    assert check.fresh("p") is None
    check.record(replace(pool_info("p"), node_states={"starttaskfailed": 2}))
    assert check.fresh("p") is None  # no usable slot: nothing to trust


def test_a_lost_run_makes_the_next_run_check_the_pool_again() -> None:
    check = PoolCheck()
    check.record(pool_info("p"))

    class Watch:
        error: BaseException | None = None

        def __call__(self, *, pending: bool) -> BaseException | None:
            return self.error

        def look_now(self) -> BaseException | None:
            return self.error

    watch = Watch()
    wrapped = ForgetOnLoss(watch, check)
    assert wrapped(pending=True) is None
    assert check.fresh("p") is not None
    watch.error = RunLostError("the pool p was deleted", 404, "PoolDeleted", "watch the pool p")
    assert wrapped.look_now() is watch.error
    assert check.fresh("p") is None


@pytest.mark.parametrize(
    ("work", "parallel"),
    [
        (lambda: (delayed(triple)(x) for x in range(3)), {}),  # fewer calls than slots
        (lambda: [delayed(triple)(x) for x in range(3)], {}),
        (lambda: [delayed(triple)(x) for x in range(40)], {"pre_dispatch": "all"}),
        (lambda: (delayed(triple)(x) for x in range(40)), {"pre_dispatch": 1}),
        (lambda: (delayed(triple)(x) for x in range(40)), {"batch_size": 3}),
    ],
    ids=["short-generator", "short-list", "pre-dispatch-all", "pre-dispatch-1", "fixed-size"],
)
def test_sending_ahead_neither_loses_nor_repeats_a_call(batch, store, nodes, work, parallel):
    backend = backend_for(batch, store)
    halt = nodes.keep_running()
    try:
        expected = [3 * x for x in range(len(list(work())))]
        assert Call(backend, work, **parallel).join() == expected
    finally:
        halt()
    # Every call ran once: the tasks' calls add up to the input.
    assert sum(nodes.sizes.values()) == len(expected)


def test_a_lingering_pool_is_taken_back_by_the_next_call_and_flushed_at_exit(batch, store, nodes):
    backend = backend_for(batch, store, keep_pool=False, pool_linger=600.0)
    three_calls(backend, nodes)
    # Read by every call (the library may delete it), created once, deleted by none.
    assert batch.calls["get_pool"] == 3
    assert len(batch.deleted_pools) == 0
    POOLS.flush()  # at exit
    assert len(batch.deleted_pools) == 1

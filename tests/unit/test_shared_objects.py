"""Every large argument crosses once per job, whatever its type, and is never sent stale.

The writer's two phases (dump every task of a flush, then store the flush) are driven here
through the submitter, as a run drives them, against the in-memory blob store: an object
that several calls share is one blob of ``jobs/{job}/objects/``, one that a single call uses
travels inside that task's signed payload, and the worker's side (`load_calls`) is run on
what was stored.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import itertools
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pandas as pd
import pytest
from joblib._parallel_backends import SequentialBackend
from joblib.parallel import BatchedCalls
from sklearn.ensemble import RandomForestClassifier

from joblib_azurebatch import _joblib_compat as compat
from joblib_azurebatch import submitter as submitter_module
from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.environment import referenced_modules
from joblib_azurebatch.errors import PayloadError
from joblib_azurebatch.payload import (
    PayloadWriter,
    decode_task,
    load_calls,
    payload_blob,
)
from joblib_azurebatch.pools import PoolRegistry
from joblib_azurebatch.run import Account, JobRun, RunState
from joblib_azurebatch.sizing import BatchSizer
from joblib_azurebatch.submitter import Part, Submitter, Task, TaskTemplate
from tests.fakes import FakeBatch, MemoryStore

KEY = bytes(range(32))
JOB = "job1"
THRESHOLD = 4096


# ---------------------------------------------------------------------- what the calls do


def total(obj: Any, i: int = 0) -> float:
    """A number that depends on every element of ``obj``, whatever its type."""
    if isinstance(obj, np.ndarray):
        return float(obj.sum()) + i
    if isinstance(obj, pd.DataFrame):
        return float(obj["x"].sum()) + sum(map(len, obj["label"])) + i
    if isinstance(obj, (bytes, bytearray)):
        return float(sum(obj[::97])) + i
    if isinstance(obj, dict):
        return float(sum(obj.values())) + i
    return float(sum(obj)) + i


def scaled(i: int, *, data: Any) -> float:
    return total(data) * i


class Model:
    """Stands in for a fitted estimator: a large state and a method to call."""

    def __init__(self, weights: list[float]) -> None:
        self.weights = weights

    def score(self, i: int) -> float:
        return sum(self.weights) + i


def predict_sum(model: RandomForestClassifier, X: np.ndarray) -> int:
    return int(model.predict(X).sum())


# ---------------------------------------------------------------------- helpers


def calls(*items: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> BatchedCalls:
    return BatchedCalls(list(items), (SequentialBackend(), 1))


def run_task(store: MemoryStore, task_id: str, key: bytes = KEY, job: str = JOB) -> Any:
    """What the worker does with a stored task: verify, load (inline objects first), run."""
    envelope = decode_task(store.blobs[payload_blob(job, task_id)], key)
    return load_calls(envelope, lambda sha: store.blobs[f"jobs/{job}/objects/{sha}"])()


def new_writer(store: MemoryStore, threshold: int = THRESHOLD) -> PayloadWriter:
    return PayloadWriter(
        store, job_id=JOB, signing_key=KEY, inline_threshold=threshold, sas_expiry=600.0
    )


class Flusher:
    """A submitter whose flushes the test makes itself, on the submitter's prepare pool."""

    def __init__(self, writer: PayloadWriter) -> None:
        self.batch = FakeBatch()
        self.batch.add_job(JOB)
        self.failed: dict[str, BaseException] = {}
        ids = itertools.count()
        self.submitter = Submitter(
            self.batch,
            JOB,
            prepare=writer.prepare,
            template=TaskTemplate(image="img", max_retries=0, max_wall_clock=None),
            n_jobs=4,
            new_task_id=lambda: f"t{next(ids):03d}",
            register=lambda tasks: None,
            fail=lambda task_id, error: self.failed.setdefault(task_id, error),
            is_open=lambda: True,
        )
        self.submitter.start()

    def flush(self, *batches: BatchedCalls) -> list[str]:
        """One flush of one task per batch; returns the task ids."""
        tasks = [
            Task(f"f{self.submitter.tasks_submitted + i:03d}", [Part(Future(), None, 1, b)], False)
            for i, b in enumerate(batches)
        ]
        self.submitter.flush(tasks)
        assert self.failed == {}
        return [t.task_id for t in tasks]

    def close(self) -> None:
        self.submitter.stop()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def flusher(store: MemoryStore) -> Iterator[Flusher]:
    made = Flusher(new_writer(store))
    yield made
    made.close()


def payloads(store: MemoryStore) -> dict[str, bytes]:
    return {name: data for name, data in store.blobs.items() if name.endswith("/payload")}


def _forest() -> tuple[RandomForestClassifier, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5))
    y = (X[:, 0] > 0).astype(int)
    return RandomForestClassifier(n_estimators=10, random_state=0).fit(X, y), X


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame({"x": rng.normal(size=2000), "label": [f"row {i}" for i in range(2000)]})


# Each case: (make the shared object, make one call that uses it with the task's number i).
_CallOf = Callable[[Any, int], tuple[Any, tuple[Any, ...], dict[str, Any]]]
KINDS: dict[str, tuple[Callable[[], Any], _CallOf]] = {
    "ndarray": (lambda: np.arange(4000.0), lambda obj, i: (total, (obj, i), {})),
    "bytes": (lambda: bytes(range(256)) * 40, lambda obj, i: (total, (obj, i), {})),
    "list of ints": (lambda: list(range(5000)), lambda obj, i: (total, (obj, i), {})),
    "tuple": (lambda: tuple(range(5000)), lambda obj, i: (total, (obj, i), {})),
    "dict": (lambda: {f"k{j}": j for j in range(2000)}, lambda obj, i: (total, (obj, i), {})),
    "frame with strings": (_frame, lambda obj, i: (total, (obj, i), {})),
    "keyword value": (lambda: list(range(5000)), lambda obj, i: (scaled, (i,), {"data": obj})),
    "bound method": (lambda: Model([0.5] * 5000), lambda obj, i: (obj.score, (i,), {})),
    "partial": (
        lambda: functools.partial(scaled, data=list(range(5000))),
        lambda obj, i: (obj, (i,), {}),
    ),
}


# ---------------------------------------------------------------------- stored once


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_distinct_large_object_is_uploaded_once_across_many_tasks(
    kind: str, store: MemoryStore, flusher: Flusher
) -> None:
    make, call_of = KINDS[kind]
    obj = make()
    ids: list[str] = []
    for flush in range(3):
        ids += flusher.flush(*(calls(call_of(obj, 8 * flush + i)) for i in range(8)))
    assert len(store.object_uploads()) == 1, kind
    (name,) = store.object_uploads()
    size = len(store.blobs[name])
    assert size >= THRESHOLD
    # No payload carries a copy: every task names the object.
    assert all(len(p) < THRESHOLD for p in payloads(store).values())
    assert sum(map(len, store.blobs.values())) < size + 24 * THRESHOLD
    expected = [call_of(obj, i) for i in range(24)]
    assert [run_task(store, t) for t in ids] == [[f(*a, **k)] for f, a, k in expected]


def test_a_fitted_estimator_and_its_bound_method_are_one_object(
    store: MemoryStore, flusher: Flusher
) -> None:
    model, X = _forest()
    ids = flusher.flush(*(calls((predict_sum, (model, X[i::4]), {})) for i in range(4)))
    ids += flusher.flush(*(calls((model.predict, (X[i::4],), {})) for i in range(4)))
    # The forest, once, for both ways of calling it (the rows are below the threshold).
    (model_blob,) = store.object_uploads()
    assert pickle.loads(store.blobs[model_blob]).get_params() == model.get_params()
    assert [run_task(store, t) for t in ids[:4]] == [
        [predict_sum(model, X[i::4])] for i in range(4)
    ]
    assert np.array_equal(run_task(store, ids[4])[0], model.predict(X[0::4]))


def test_objects_are_uploaded_in_parallel_and_once_when_tasks_share_them(
    store: MemoryStore, flusher: Flusher
) -> None:
    shared = [np.full(2000, j, dtype=np.float64) for j in range(6)]
    threads: set[str] = set()
    upload = store.upload

    def recording_upload(name: str, data: bytes, *, overwrite: bool = True) -> None:
        if "/objects/" in name:
            threads.add(threading.current_thread().name)
            time.sleep(0.05)  # long enough for the others to start
        upload(name, data, overwrite=overwrite)

    store.upload = recording_upload  # type: ignore[method-assign]
    ids = flusher.flush(*(calls((total, (shared[i % 6], i), {})) for i in range(24)))
    assert len(store.object_uploads()) == 6
    assert len(threads) > 1
    assert all(name.startswith("azurebatch-prepare-") for name in threads)
    assert [run_task(store, t) for t in ids[:6]] == [[2000.0 * j + j] for j in range(6)]


# ---------------------------------------------------------------------- never stale


def test_an_array_changed_in_place_between_two_flushes_is_sent_with_its_new_content(
    store: MemoryStore, flusher: Flusher
) -> None:
    X = np.zeros(2000)
    before = flusher.flush(*(calls((total, (X, 0), {})) for _ in range(2)))
    X += 1.0  # same object, same id(), new content
    after = flusher.flush(*(calls((total, (X, 0), {})) for _ in range(2)))
    assert [run_task(store, t) for t in before] == [[0.0], [0.0]]
    assert [run_task(store, t) for t in after] == [[2000.0], [2000.0]]
    assert len(store.object_uploads()) == 2


def test_an_object_changed_in_place_between_two_prepares_is_sent_with_its_new_content(
    store: MemoryStore,
) -> None:
    writer = new_writer(store)
    weights = list(range(3000))
    first = writer.prepare("a", calls((total, (weights, 0), {})))
    weights[0] = 10**6
    second = writer.prepare("b", calls((total, (weights, 0), {})))
    assert first.objects != second.objects
    assert run_task(store, "a") == [float(sum(range(3000)))]
    assert run_task(store, "b") == [float(sum(weights))]


# ---------------------------------------------------------------------- nothing held


class Holder:
    """A large argument that can be weakly referenced."""

    def __init__(self, n: int) -> None:
        self.values = list(range(n))

    def __iter__(self) -> Iterator[int]:
        return iter(self.values)


def test_the_writer_holds_no_argument_once_its_task_is_dumped_or_prepared(
    store: MemoryStore,
) -> None:
    writer = new_writer(store)
    big, array = Holder(5000), np.arange(5000.0)
    refs = [weakref.ref(big), weakref.ref(array)]
    batch = calls((total, (big, 0), {}), (total, (array, 0), {}))
    dumped = writer.dump("a", batch)
    writer.prepare("b", calls((total, (array, 1), {})))
    del big, array, batch
    gc.collect()
    assert [r() for r in refs] == [None, None]
    (prepared,) = writer.store([dumped])
    assert not isinstance(prepared, Exception)
    assert run_task(store, "a") == [float(sum(range(5000)))] * 2


class RunStore(MemoryStore):
    """The blob container a run needs: `MemoryStore` and the two calls a run adds."""

    def ensure_container(self) -> None:
        pass

    def delete_prefix(self, prefix: str) -> int:
        with self.lock:
            gone = [n for n in self.blobs if n.startswith(prefix)]
            for name in gone:
                del self.blobs[name]
        return len(gone)


def make_run(batch: FakeBatch, store: RunStore) -> JobRun:
    cfg = BatchConfig(poll_interval=0.005, progress=False, image="worker:1", keep_blobs=True)
    return JobRun(
        Account(cfg=cfg, service=batch, store=store),  # type: ignore[arg-type]
        n_jobs=4,
        sizer=BatchSizer(n_jobs=4, min_duration=2.0, max_duration=60.0),
        scheduling_latency=1.0,
        features=compat.Features(None),
        pools=PoolRegistry(),
    )


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def test_a_live_run_holds_no_argument_once_its_task_is_prepared() -> None:
    batch, store = FakeBatch(), RunStore()
    run = make_run(batch, store)
    try:
        refs = []
        for i in range(3):
            arg, array = Holder(20_000 + i), np.full(10_000, float(i))  # both over 64 KiB
            refs += [weakref.ref(arg), weakref.ref(array)]
            run.submit(calls((total, (arg, i), {}), (total, (array, 0), {})), None)
            del arg, array
        wait_for(lambda: sum(map(len, batch.added)) == 3)
        gc.collect()
        assert run.state is RunState.RUNNING  # the tasks are in Batch, not finished
        assert [r() for r in refs] == [None] * 6
        added = [t for group in batch.added for t in group]
        assert sorted(run_task(store, t, run._key, run.job_id) for t in added) == [
            [float(sum(range(20_000 + i)) + i), 10_000.0 * i] for i in range(3)
        ]
    finally:
        run.close()


def test_the_first_task_is_stored_with_the_first_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared array in the one-call first task is stored once, not inlined then uploaded."""
    monkeypatch.setattr(submitter_module, "LINGER", 1.0)
    batch, store = FakeBatch(), RunStore()
    run = make_run(batch, store)
    try:
        X = np.arange(20_000.0)
        for i in range(4):
            run.submit(calls((total, (X, i), {})), None)
        wait_for(lambda: sum(map(len, batch.added)) == 4)
        assert len(batch.added) == 1  # one flush, the first task in it
        objects = [n for n in store.blobs if "/objects/" in n]
        assert len(objects) == 1
        assert all(len(p) < X.nbytes / 10 for p in payloads(store).values())
        added = batch.added[0]
        assert [run_task(store, t, run._key, run.job_id) for t in added] == [
            [X.sum() + i] for i in range(4)
        ]
    finally:
        run.close()


# ---------------------------------------------------------------------- inline


def test_an_object_one_call_uses_travels_inline(store: MemoryStore, flusher: Flusher) -> None:
    alone, shared, twice = np.arange(3000.0), list(range(4000)), Holder(3000)
    ids = flusher.flush(
        calls((total, (alone, 0), {})),
        calls((total, (shared, 1), {})),
        calls((total, (shared, 2), {})),
        calls((total, (twice, 0), {}), (total, (twice, 5), {})),  # two calls of one task
    )
    sha_alone = hashlib.sha256(pickle.dumps(alone, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()
    assert f"jobs/{JOB}/objects/{sha_alone}" not in store.blobs
    assert len(store.object_uploads()) == 2  # the list two tasks share, the object two calls do
    envelope = decode_task(store.blobs[payload_blob(JOB, ids[0])], KEY)
    assert list(envelope.inline) == [sha_alone]
    assert envelope.objects == {}
    assert len(store.blobs[payload_blob(JOB, ids[0])]) > alone.nbytes
    assert [run_task(store, t) for t in ids] == [
        [alone.sum()],
        [sum(shared) + 1.0],
        [sum(shared) + 2.0],
        [sum(range(3000)) + 0.0, sum(range(3000)) + 5.0],
    ]
    # Referenced again by one call of a later flush: stored now, for the tasks to come.
    (later,) = flusher.flush(calls((total, (alone, 7), {})))
    assert f"jobs/{JOB}/objects/{sha_alone}" in store.blobs
    assert decode_task(store.blobs[payload_blob(JOB, later)], KEY).inline == {}
    assert run_task(store, later) == [alone.sum() + 7]


class _Boom:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("unpickled!",))


def test_tampered_inline_bytes_are_refused(
    store: MemoryStore, flusher: Flusher, capsys: pytest.CaptureFixture[str]
) -> None:
    (task,) = flusher.flush(calls((total, (list(range(4000)), 0), {})))
    name = payload_blob(JOB, task)
    envelope = decode_task(store.blobs[name], KEY)
    ((sha, data),) = envelope.inline.items()
    # In the blob: the MAC covers the inline bytes.
    blob = bytearray(store.blobs[name])
    blob[blob.index(data[-50:]) + 10] ^= 0x01
    with pytest.raises(PayloadError, match="signature verification"):
        decode_task(bytes(blob), KEY)
    # Past the MAC (a bug, or a signed envelope with wrong bytes): the sha256 still holds.
    swapped = dataclasses.replace(envelope, inline={sha: pickle.dumps(_Boom())})
    with pytest.raises(PayloadError, match="does not match its sha256; it was not unpickled"):
        load_calls(swapped, lambda sha: b"")
    assert "unpickled!" not in capsys.readouterr().out


def test_refresh_keeps_the_inline_objects(store: MemoryStore, flusher: Flusher) -> None:
    writer = flusher.submitter._writer
    assert writer is not None
    (old,) = flusher.flush(calls((total, (list(range(4000)), 3), {})))
    fresh = writer.refresh(old, "again")
    assert set(fresh.inline) == set(decode_task(store.blobs[payload_blob(JOB, old)], KEY).inline)
    assert fresh.objects == ()
    assert run_task(store, "again") == [float(sum(range(4000)) + 3)]


class IdentityStore(MemoryStore):
    """A store whose nodes read the container as the pool's managed identity."""

    node_identity = "/subscriptions/s/resourceGroups/g/providers/x/userAssignedIdentities/i"
    container_url = "https://account.blob.core.windows.net/container"


def test_node_identity_mode_names_stored_objects_and_carries_inline_ones() -> None:
    store = IdentityStore()
    flusher = Flusher(new_writer(store))
    try:
        shared, alone = np.arange(3000.0), list(range(4000))
        ids = flusher.flush(
            calls((total, (shared, 0), {}), (total, (alone, 0), {})),
            calls((total, (shared, 1), {})),
        )
    finally:
        flusher.close()
    envelope = decode_task(store.blobs[payload_blob(JOB, ids[0])], KEY)
    ((sha, blob),) = envelope.objects.items()
    assert blob == f"jobs/{JOB}/objects/{sha}"
    assert blob in store.blobs
    assert len(envelope.inline) == 1
    assert run_task(store, ids[0]) == [shared.sum(), float(sum(alone))]


def test_pickles_show_the_modules_a_stored_estimator_needs(store: MemoryStore) -> None:
    model, X = _forest()
    pickled = new_writer(store).pickles(calls((predict_sum, (model, X), {})))
    assert len(pickled) == 3  # the calls, the forest, the array
    assert "sklearn" not in str(referenced_modules(pickled[0]))
    assert any(m.startswith("sklearn.") for data in pickled for m in referenced_modules(data))
    assert store.uploads == []


def test_a_task_that_is_not_batched_calls_keeps_the_array_fast_path(store: MemoryStore) -> None:
    X = np.arange(3000.0)
    prepared = new_writer(store).prepare("t", functools.partial(total, X, 1))
    assert len(prepared.objects) == 1
    assert run_task(store, "t") == X.sum() + 1


def test_a_dump_counts_an_object_it_shares_with_an_earlier_dump_once(store: MemoryStore) -> None:
    """What the sizer's memory cap learns from: a shared array is the client's memory once,
    an array of each call's own is memory per call."""
    writer = new_writer(store)
    shared = np.arange(20_000, dtype=np.float64)  # 160 kB
    first = writer.dump("t1", calls((total, (shared,), {})))
    second = writer.dump("t2", calls((total, (shared,), {})))
    own = writer.dump("t3", calls((total, (np.ones(20_000),), {})))
    assert first.nbytes > shared.nbytes
    assert second.nbytes < 4096
    assert own.nbytes > 20_000 * 8

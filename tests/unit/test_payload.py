"""Task and result envelopes: round trips, shared objects stored once, tampering, exceptions."""

from __future__ import annotations

import hashlib
import hmac
import pickle
import sys
import threading
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import cloudpickle
import numpy as np
import pandas as pd
import pytest
from joblib._parallel_backends import SequentialBackend
from joblib.parallel import BatchedCalls
from sklearn.utils import parallel as sklearn_parallel

from joblib_azurebatch import payload
from joblib_azurebatch.errors import PayloadError, RemoteError, VersionMismatchError
from joblib_azurebatch.payload import (
    OBJECT_TAG,
    PAYLOAD_URL_ENV,
    RESULT_URL_ENV,
    SIGNING_KEY_ENV,
    PayloadWriter,
    RemoteTraceback,
    check_task_binding,
    check_versions,
    decode_task,
    encode_result,
    load_calls,
    read_result,
)
from tests.fakes import MemoryStore

KEY = bytes(range(32))


def batch(*calls: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> BatchedCalls:
    return BatchedCalls(list(calls), (SequentialBackend(), 1))


def run_on_worker(store: MemoryStore, task: payload.PreparedTask, key: bytes = KEY) -> Any:
    """What the worker does, without the network: verify, check, load, run, encode, read."""
    envelope = decode_task(store.blobs[task.payload_blob], key)
    check_versions(envelope.client)
    assert set(envelope.objects) == set(task.objects)
    calls = load_calls(envelope, lambda sha: store.blobs[f"jobs/job1/objects/{sha}"])
    try:
        value, error = calls(), None
    except Exception as e:
        value, error = None, e
    check_task_binding(envelope, job_id="job1", task_id=task.task_id)
    data = encode_result(
        job_id=envelope.job_id, task_id=envelope.task_id, key=key, value=value, error=error
    )
    return read_result(data, key, job_id="job1", task_id=task.task_id)


def writer(store: MemoryStore, threshold: int = 1024) -> PayloadWriter:
    return PayloadWriter(
        store, job_id="job1", signing_key=KEY, inline_threshold=threshold, sas_expiry=600.0
    )


def add(a: int, b: int = 0) -> int:
    return a + b


def column_means(frame: pd.DataFrame) -> list[float]:
    return [float(v) for v in frame.mean(numeric_only=True)]


class UserError(Exception):
    pass


def fails(x: int) -> int:
    raise UserError(f"bad value {x}")


class KeywordOnlyError(Exception):
    def __init__(self, *, code: int) -> None:
        super().__init__(f"code {code}")


def fails_with_keyword_only() -> None:
    raise KeywordOnlyError(code=7)


class LockedError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def fails_with_lock() -> None:
    raise LockedError("holds a lock")


def test_small_calls_round_trip_inline() -> None:
    store = MemoryStore()
    task = writer(store).prepare("t0", batch((add, (1,), {"b": 2}), (add, (5,), {})))
    assert task.objects == ()
    assert store.object_uploads() == []
    assert store.uploads == ["jobs/job1/tasks/t0/payload"]
    assert task.payload_blob == "jobs/job1/tasks/t0/payload"
    assert task.result_blob == "jobs/job1/tasks/t0/result"
    assert run_on_worker(store, task).result() == [3, 5]


def test_task_environment_has_scoped_urls_and_the_key() -> None:
    task = writer(MemoryStore()).prepare("t0", batch((add, (1,), {})))
    env = task.environment
    assert set(env) == {PAYLOAD_URL_ENV, RESULT_URL_ENV, SIGNING_KEY_ENV}
    assert env[PAYLOAD_URL_ENV] == "memory://jobs/job1/tasks/t0/payload?r&se=600"
    assert env[RESULT_URL_ENV] == "memory://jobs/job1/tasks/t0/result?cw&se=600"
    assert bytes.fromhex(env[SIGNING_KEY_ENV]) == KEY
    assert KEY.hex() not in repr(task)


def test_large_array_is_stored_once_for_many_tasks() -> None:
    store = MemoryStore()
    w = writer(store, threshold=65536)
    X = np.random.default_rng(0).normal(size=(2000, 50))  # 800 kB
    tasks = [w.prepare(f"t{i}", batch((np.sum, (X,), {}))) for i in range(10)]
    # Hashed by every task (from the bytes it sends), stored once.
    assert w.objects_hashed == 10
    assert w.objects_uploaded == 1
    assert len(store.object_uploads()) == 1
    assert w.object_bytes_uploaded >= X.nbytes
    for task in tasks:
        assert len(task.objects) == 1
        assert task.payload_bytes < 4096  # the array is referenced, not copied
    assert run_on_worker(store, tasks[3]).result() == [pytest.approx(X.sum())]
    # Equal content in another array is the same object: hashed again, stored once.
    w.prepare("copy", batch((np.sum, (X.copy(),), {})))
    assert (w.objects_hashed, w.objects_uploaded) == (11, 1)


def test_several_objects_and_repeats_in_one_task() -> None:
    store = MemoryStore()
    a, b = np.arange(5000.0), np.ones(3000)
    task = writer(store).prepare("t", batch((np.dot, (a[:3000], b), {}), (np.sum, (a,), {})))
    # a[:3000] is a view: pickled on its own, so three distinct objects
    assert len(task.objects) == 3
    values = run_on_worker(store, task).result()
    assert values == [pytest.approx(a[:3000].sum()), pytest.approx(a.sum())]
    same = writer(store).prepare("t2", batch((np.dot, (a, a), {})))
    assert len(same.objects) == 1


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_bytes_over_the_threshold_go_to_the_object_store(kind: type) -> None:
    store = MemoryStore()
    big, small = kind(b"x" * 5000), kind(b"y" * 100)
    task = writer(store).prepare("t", batch((len, (big,), {}), (len, (small,), {})))
    assert len(task.objects) == 1
    assert run_on_worker(store, task).result() == [5000, 100]


def test_threshold_is_inclusive() -> None:
    store = MemoryStore()
    at = writer(store, threshold=8000).prepare("t", batch((np.sum, (np.zeros(1000),), {})))
    below = writer(store, threshold=8001).prepare("u", batch((np.sum, (np.zeros(1000),), {})))
    assert (len(at.objects), len(below.objects)) == (1, 0)


def test_a_pandas_frame_of_any_dtypes_is_one_object() -> None:
    store = MemoryStore()
    frame = pd.DataFrame(np.random.default_rng(1).normal(size=(10000, 4)), columns=list("abcd"))
    frame["label"] = ["x", "y"] * 5000
    task = writer(store, threshold=65536).prepare("t", batch((column_means, (frame,), {})))
    assert len(task.objects) == 1  # the string column too, not only the numeric block
    assert task.payload_bytes < 4096
    assert run_on_worker(store, task).result() == [column_means(frame)]


def test_object_arrays_are_objects_as_arguments_and_inline_when_nested_small() -> None:
    store = MemoryStore()
    arr = np.array([object()] * 10 + ["s" * 10000], dtype=object)
    task = writer(store, threshold=4096).prepare("t", batch((len, (arr,), {})))
    assert len(task.objects) == 1  # by its pickle's size, not by the fast path
    assert run_on_worker(store, task).result() == [11]
    small = np.array(["s"] * 10, dtype=object)
    task = writer(store, threshold=16).prepare("u", batch((len, (small,), {})))
    assert task.objects == ()  # under the least size of an object stored on its own
    assert run_on_worker(store, task).result() == [10]


def test_concurrent_tasks_store_each_object_once() -> None:
    store = MemoryStore()
    w = writer(store)
    shared = [np.full(1000, i, dtype=np.float64) for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        tasks = list(
            pool.map(lambda i: w.prepare(f"t{i}", batch((np.sum, (shared[i % 4],), {}))), range(32))
        )
    assert len(store.object_uploads()) == 4
    assert w.objects_uploaded == 4
    assert [run_on_worker(store, t).result() for t in tasks[:4]] == [
        [0.0],
        [1000.0],
        [2000.0],
        [3000.0],
    ]


def test_unpicklable_function_is_named_and_nothing_is_uploaded() -> None:
    store = MemoryStore()
    lock = threading.Lock()

    def uses_a_lock(x: int) -> int:
        with lock:
            return x

    big = np.zeros(10000)
    with pytest.raises(PayloadError) as info:
        writer(store).prepare("t", batch((np.sum, (big,), {}), (uses_a_lock, (1,), {})))
    message = str(info.value)
    assert "the function" in message
    assert "uses_a_lock" in message
    assert "module level" in message
    assert store.uploads == []


def test_unpicklable_argument_is_named() -> None:
    store = MemoryStore()
    with pytest.raises(PayloadError, match=r"an argument of .*\.add"):
        writer(store).prepare("t", batch((add, (threading.Lock(),), {})))
    assert store.uploads == []


def test_user_exception_keeps_its_type_and_remote_traceback() -> None:
    store = MemoryStore()
    result = run_on_worker(store, writer(store).prepare("t", batch((fails, (41,), {}))))
    assert not result.ok
    assert result.exc_type.endswith("UserError")
    with pytest.raises(UserError, match="bad value 41") as info:
        result.result()
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fails" in cause.tb
    assert 'raise UserError(f"bad value {x}")' in cause.tb
    assert "Azure Batch node" in str(cause)


@pytest.mark.parametrize(
    ("func", "type_name", "message"),
    [
        (fails_with_keyword_only, "KeywordOnlyError", "code 7"),
        (fails_with_lock, "LockedError", "holds a lock"),
    ],
)
def test_exception_that_does_not_pickle_becomes_remote_error(
    func: Any, type_name: str, message: str
) -> None:
    store = MemoryStore()
    result = run_on_worker(store, writer(store).prepare("t", batch((func, (), {}))))
    assert result.exception_bytes is None
    with pytest.raises(RemoteError) as info:
        result.result()
    error = info.value
    assert error.type_name.endswith(type_name)
    assert error.message == message
    assert f"in {func.__name__}" in error.remote_traceback
    assert type_name in str(error)
    assert message in str(error)


def test_unpicklable_return_value_is_a_payload_error_result() -> None:
    data = encode_result(job_id="j", task_id="t", key=KEY, value=[threading.Lock()])
    result = read_result(data, KEY, job_id="j", task_id="t")
    assert not result.ok
    with pytest.raises(PayloadError, match="return value of task t cannot be pickled"):
        result.result()


def test_timings_and_worker_versions_travel() -> None:
    data = encode_result(
        job_id="j", task_id="t", key=KEY, value=[1], timings={"run": 1.5, "download": 0.25}
    )
    result = read_result(data, KEY, job_id="j", task_id="t")
    assert result.timings == {"run": 1.5, "download": 0.25}
    assert result.worker == payload.versions()
    assert result.result() == [1]


# ---------------------------------------------------------------------- tampering


def _sealed() -> bytes:
    store = MemoryStore()
    task = writer(store).prepare("t", batch((add, (1,), {})))
    return store.blobs[task.payload_blob]


@pytest.mark.parametrize("position", [0, 4, 10, 40, -1])
def test_any_changed_byte_fails_verification(position: int) -> None:
    data = bytearray(_sealed())
    data[position] ^= 0x01
    with pytest.raises(PayloadError):
        decode_task(bytes(data), KEY)


def test_wrong_key_truncation_and_wrong_kind_are_refused() -> None:
    data = _sealed()
    with pytest.raises(PayloadError, match="signature verification"):
        decode_task(data, bytes(32))
    with pytest.raises(PayloadError):
        decode_task(data[:-10], KEY)
    with pytest.raises(PayloadError):
        decode_task(data[:20], KEY)
    with pytest.raises(PayloadError, match="wrong magic"):
        read_result(data, KEY, job_id="job1", task_id="t")  # a task envelope is not a result
    assert decode_task(data, KEY).task_id == "t"


def test_unknown_envelope_version_is_refused() -> None:
    data = bytearray(_sealed())
    data[4] = 99
    with pytest.raises(PayloadError, match="envelope version 99"):
        decode_task(bytes(data), KEY)


def _sealed_as_version(magic: bytes, body: dict[str, Any], version: int) -> bytes:
    """An envelope as a release writing ``version`` would seal it, with the same key."""
    data = pickle.dumps(body, protocol=4)
    head = magic + bytes([version])
    return head + hmac.new(KEY, head + data, hashlib.sha256).digest() + data


def test_a_task_envelope_without_inline_objects_is_refused_by_its_version() -> None:
    body = {"job_id": "job1", "task_id": "t", "client": payload.versions(), "objects": {}}
    data = _sealed_as_version(payload.TASK_MAGIC, {**body, "calls": b""}, 2)
    with pytest.raises(PayloadError, match="envelope version 2, this side reads version 3"):
        decode_task(data, KEY)


def test_an_envelope_of_the_previous_format_is_refused_on_both_sides() -> None:
    old_result = {"task_id": "t", "ok": True, "value": pickle.dumps([1]), "exception": None}
    data = _sealed_as_version(payload.RESULT_MAGIC, old_result, 1)
    with pytest.raises(PayloadError) as info:
        read_result(data, KEY, job_id="j", task_id="t")
    message = str(info.value)
    assert (
        f"task result has envelope version 1, this side reads version {payload.ENVELOPE_VERSION}"
        in message
    )
    assert "an older release of joblib-azurebatch wrote it" in message
    assert "install the same release in both" in message
    newer = bytearray(_sealed())
    newer[4] = payload.ENVELOPE_VERSION + 1
    with pytest.raises(PayloadError, match="a newer release of joblib-azurebatch wrote it"):
        decode_task(bytes(newer), KEY)


# ---------------------------------------------------------------------- binding to the task


def test_a_payload_swapped_into_another_tasks_blob_is_refused_by_the_worker_check() -> None:
    store = MemoryStore()
    w = writer(store)
    a = w.prepare("task-a", batch((add, (1,), {})))
    b = w.prepare("task-b", batch((add, (2,), {})))
    # Someone who may write to the container swaps the two payload blobs: both still
    # verify, since they were signed with the job's key.
    blobs = store.blobs
    blobs[a.payload_blob], blobs[b.payload_blob] = blobs[b.payload_blob], blobs[a.payload_blob]
    reached_a = decode_task(blobs[a.payload_blob], KEY)
    assert reached_a.task_id == "task-b"
    with pytest.raises(PayloadError) as info:
        check_task_binding(reached_a, job_id="job1", task_id="task-a")
    message = str(info.value)
    assert "written for task task-b of job job1, but this is task task-a of job job1" in message
    assert "replaced with another task's payload" in message
    with pytest.raises(PayloadError, match="written for task task-a of job job1"):
        check_task_binding(decode_task(blobs[b.payload_blob], KEY), job_id="job1", task_id="task-b")
    # Unswapped, each payload passes the check on its own task.
    c = w.prepare("task-c", batch((add, (3,), {})))
    check_task_binding(decode_task(blobs[c.payload_blob], KEY), job_id="job1", task_id="task-c")


def test_a_payload_of_another_job_is_refused_by_the_worker_check() -> None:
    store = MemoryStore()
    other = PayloadWriter(store, job_id="job2", signing_key=KEY, sas_expiry=600.0)
    envelope = decode_task(
        store.blobs[other.prepare("t", batch((add, (1,), {}))).payload_blob], KEY
    )
    with pytest.raises(
        PayloadError, match="written for task t of job job2, but this is task t of job job1"
    ):
        check_task_binding(envelope, job_id="job1", task_id="t")


def test_a_result_of_task_b_read_as_task_a_is_refused() -> None:
    data = encode_result(job_id="job1", task_id="task-b", key=KEY, value=[2])
    assert read_result(data, KEY, job_id="job1", task_id="task-b").result() == [2]
    with pytest.raises(PayloadError) as info:
        read_result(data, KEY, job_id="job1", task_id="task-a")
    message = str(info.value)
    assert "result read for task task-a of job job1 was written by task task-b of job job1" in (
        message
    )
    assert "replaced with another task's result" in message


def test_a_result_of_another_job_is_refused() -> None:
    # Two jobs of one client never share a key, but the check does not rely on it.
    data = encode_result(job_id="job2", task_id="t", key=KEY, value=[2])
    with pytest.raises(PayloadError, match="written by task t of job job2"):
        read_result(data, KEY, job_id="job1", task_id="t")


def test_a_result_names_the_attempt_that_wrote_it() -> None:
    attempt = payload.new_attempt("tvm-7")
    data = encode_result(job_id="j", task_id="t", key=KEY, attempt=attempt, value=[1])
    result = read_result(data, KEY, job_id="j", task_id="t")
    assert (result.job_id, result.task_id, result.attempt) == ("j", "t", attempt)
    assert attempt["node_id"] == "tvm-7"
    assert attempt["started"].endswith("Z")
    # Two runs of one task on one node, started in the same second, still differ.
    assert payload.new_attempt("tvm-7")["nonce"] != attempt["nonce"]
    unnamed = read_result(
        encode_result(job_id="j", task_id="t", key=KEY, value=[1]), KEY, job_id="j", task_id="t"
    )
    assert set(unnamed.attempt) == {"node_id", "started", "nonce"}


class _Boom:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("unpickled!",))


def test_a_signed_body_with_a_global_is_still_not_unpickled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = pickle.dumps({"job_id": "j", "evil": _Boom()}, protocol=4)
    head = payload.TASK_MAGIC + bytes([payload.ENVELOPE_VERSION])
    data = head + hmac.new(KEY, head + body, hashlib.sha256).digest() + body
    with pytest.raises(PayloadError, match="plain data"):
        decode_task(data, KEY)
    assert "unpickled!" not in capsys.readouterr().out


def test_object_with_the_wrong_content_is_not_unpickled() -> None:
    store = MemoryStore()
    task = writer(store).prepare("t", batch((np.sum, (np.ones(1000),), {})))
    envelope = decode_task(store.blobs[task.payload_blob], KEY)
    with pytest.raises(PayloadError, match="does not match its sha256"):
        load_calls(envelope, lambda sha: pickle.dumps(np.zeros(1000)))


def test_persistent_ids_name_the_objects() -> None:
    store = MemoryStore()
    X = np.arange(1000.0)
    task = writer(store).prepare("t", batch((np.sum, (X,), {})))
    sha = hashlib.sha256(pickle.dumps(X, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()
    assert task.objects == (sha,)
    assert store.blobs[f"jobs/job1/objects/{sha}"] == pickle.dumps(
        X, protocol=pickle.HIGHEST_PROTOCOL
    )
    envelope = decode_task(store.blobs[task.payload_blob], KEY)
    assert OBJECT_TAG.encode() in envelope.calls


# ---------------------------------------------------------------------- versions


def test_equal_versions_pass_and_joblib_patch_releases_are_compatible() -> None:
    mine = payload.versions()
    check_versions(mine)
    major, minor = mine["joblib"].split(".")[:2]
    check_versions({**mine, "joblib": f"{major}.{minor}.99"})


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"python": "3.9"}, "python"),
        ({"cloudpickle": "0.0.1"}, "cloudpickle"),
        ({"joblib": "0.1.0"}, "joblib"),
    ],
)
def test_version_mismatch_says_what_to_build_or_install(change: dict[str, str], named: str) -> None:
    client = {**payload.versions(), **change}
    with pytest.raises(VersionMismatchError) as info:
        check_versions(client)
    message = str(info.value)
    assert f"different: {named}" in message
    assert f"--build-arg PYTHON_VERSION={client['python']}" in message
    assert f"pip install cloudpickle=={client['cloudpickle']} joblib=={client['joblib']}" in message
    assert "BatchConfig(image=...)" in message


def test_version_mismatch_result_raises_on_the_client() -> None:
    with pytest.raises(VersionMismatchError) as mismatch:
        check_versions({**payload.versions(), "python": "2.7"})
    data = encode_result(job_id="j", task_id="t", key=KEY, error=mismatch.value)
    with pytest.raises(VersionMismatchError, match=r"PYTHON_VERSION=2\.7"):
        read_result(data, KEY, job_id="j", task_id="t").result()


def _class_in_a_module_the_client_lacks(name: str) -> dict[str, Any]:
    """Classes importable while pickling, gone by the time the client unpickles."""
    module = types.ModuleType(name)
    exec("class Gone(Exception):\n    pass\nclass Value:\n    pass\n", module.__dict__)
    sys.modules[name] = module
    return module.__dict__


def test_exception_whose_class_the_client_lacks_becomes_remote_error() -> None:
    namespace = _class_in_a_module_the_client_lacks("only_on_the_node")
    try:
        data = encode_result(
            job_id="j", task_id="t", key=KEY, error=namespace["Gone"]("from the node")
        )
    finally:
        del sys.modules["only_on_the_node"]
    result = read_result(data, KEY, job_id="j", task_id="t")
    assert result.exception_bytes is not None  # it did pickle on the node
    with pytest.raises(RemoteError) as info:
        result.result()
    assert info.value.type_name == "only_on_the_node.Gone"
    assert info.value.message == "from the node"


def test_value_whose_class_the_client_lacks_is_a_clear_payload_error() -> None:
    namespace = _class_in_a_module_the_client_lacks("only_on_the_node_too")
    try:
        data = encode_result(job_id="j", task_id="t9", key=KEY, value=[namespace["Value"]()])
    finally:
        del sys.modules["only_on_the_node_too"]
    with pytest.raises(PayloadError, match="result of task t9 cannot be unpickled here"):
        read_result(data, KEY, job_id="j", task_id="t9").result()


# ---------------------------------------------------------------------- warning filters


def _warnings_in_a_module_the_node_lacks(name: str) -> dict[str, Any]:
    """Warning classes importable while the client pickles, gone when the "node" unpickles."""
    module = types.ModuleType(name)
    exec(
        "class PluginWarning(DeprecationWarning):\n    class Nested(UserWarning):\n        pass\n",
        module.__dict__,
    )
    sys.modules[name] = module
    return module.__dict__


def filter_categories() -> list[tuple[str, type[Warning]]]:
    """The (action, category) of every warning filter active inside the call."""
    return [(f[0], f[2]) for f in cast(list[Any], warnings.filters)]


def warn_with(category: type[Warning]) -> str:
    warnings.warn("from the call", category, stacklevel=1)
    return "no error"


def sklearn_call(func: Any, *args: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """A call as scikit-learn's Parallel ships it: with the caller's warning filters."""
    wrapped = sklearn_parallel.delayed(func)(*args)[0]
    wrapped.with_config_and_warning_filters({"assume_finite": False}, list(warnings.filters))
    return (wrapped, args, {})


def test_warning_filter_on_a_class_the_node_lacks_loads_as_a_stand_in() -> None:
    namespace = _warnings_in_a_module_the_node_lacks("plugin_only_on_the_client")
    plugin, nested = namespace["PluginWarning"], namespace["PluginWarning"].Nested
    store = MemoryStore()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", plugin)
            warnings.simplefilter("ignore", nested)
            first = writer(store).prepare("t1", batch(sklearn_call(filter_categories)))
            second = writer(store).prepare(
                "t2",
                batch(sklearn_call(filter_categories), sklearn_call(warn_with, DeprecationWarning)),
            )
            plain = cloudpickle.dumps(plugin)
    finally:
        del sys.modules["plugin_only_on_the_client"]
    # Plain cloudpickle sends the class by reference, which the node cannot import.
    with pytest.raises(ModuleNotFoundError, match="plugin_only_on_the_client"):
        pickle.loads(plain)

    [categories] = run_on_worker(store, first).result()
    with pytest.warns(DeprecationWarning, match="from the call"):
        [again, warned] = run_on_worker(store, second).result()
    # simplefilter puts each new filter first.
    (ignore, nested_stand_in), (error, stand_in) = categories[:2]
    assert (ignore, error) == ("ignore", "error")
    assert stand_in is not plugin
    assert (stand_in.__module__, stand_in.__qualname__, stand_in.__name__) == (
        "plugin_only_on_the_client",
        "PluginWarning",
        "PluginWarning",
    )
    assert stand_in.__bases__ == (DeprecationWarning,)
    assert (nested_stand_in.__qualname__, nested_stand_in.__name__) == (
        "PluginWarning.Nested",
        "Nested",
    )
    assert nested_stand_in.__bases__ == (UserWarning,)
    # One class per name in a process, whichever task brought it.
    assert again[:2] == categories[:2]
    # The stand-in's filter does not catch its builtin base: the call's warning is no error.
    assert warned == "no error"


def test_warning_classes_the_node_has_arrive_as_themselves() -> None:
    store = MemoryStore()
    with warnings.catch_warnings():
        warnings.simplefilter("error", pytest.PytestCollectionWarning)
        categories = writer(store).prepare("t", batch(sklearn_call(filter_categories)))
        raises = writer(store).prepare(
            "u", batch(sklearn_call(warn_with, pytest.PytestCollectionWarning))
        )
    [[(action, category), *_]] = run_on_worker(store, categories).result()
    assert action == "error"
    assert category is pytest.PytestCollectionWarning
    with pytest.raises(pytest.PytestCollectionWarning, match="from the call"):
        run_on_worker(store, raises).result()


def test_warning_classes_cloudpickle_sends_by_value_keep_their_body() -> None:
    class LocalWarning(RuntimeWarning):
        marker = 7

    store = MemoryStore()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LocalWarning)
        task = writer(store).prepare("t", batch(sklearn_call(filter_categories)))
    [categories] = run_on_worker(store, task).result()
    action, category = categories[0]
    assert action == "error"
    assert category.__qualname__.endswith("LocalWarning")
    assert category.marker == 7
    assert issubclass(category, RuntimeWarning)

"""Resumable runs' per-call keys and records, and the `Memo` a node runs for them.

A key that moves between processes loses every stored result; a key that stays when the
code changes hands back a stale one; a record that verifies when it should not hands back
someone else's. These tests hold each of those, without any network.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from joblib._parallel_backends import SequentialBackend
from joblib.parallel import BatchedCalls

from joblib_azurebatch import memo
from joblib_azurebatch.errors import PayloadError
from joblib_azurebatch.memo import (
    SKIPPED,
    Memo,
    TaskContext,
    call_key,
    encode_record,
    job_key,
    read_record,
    record_blob,
    task_context,
)
from joblib_azurebatch.resume import Plan

REPO = Path(__file__).resolve().parents[2]
RESULTS_KEY = bytes(range(32))
KEY = job_key(RESULTS_KEY, "job1")
OTHER_KEY = job_key(RESULTS_KEY, "job2")
ENV = "env-1"

HELPER = '''
import numpy as np


def work(x, scale=3):
    """A docstring."""
    return [x * scale, len(str(x))]


ARRAY = np.arange(12, dtype=np.float64).reshape(3, 4)
'''

# The script a fresh interpreter runs: the keys of the same calls, printed as JSON.
KEYS_SCRIPT = """
import json, sys
import numpy as np
from joblib_azurebatch.memo import call_key
import {module} as helper

print(json.dumps([
    call_key(helper.work, (1,), {{}}),
    call_key(helper.work, (2,), {{"scale": 4}}),
    call_key(helper.work, (helper.ARRAY,), {{}}),
    call_key(helper.work, (np.arange(12, dtype=np.float64).reshape(3, 4),), {{}}),
]))
"""


def write_module(directory: Path, name: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def load_from(path: Path, name: str) -> types.ModuleType:
    """Load ``path`` as module ``name`` without registering it, so two files can share it."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def keys_in_fresh_interpreter(
    path: Path, module: str, *, hash_seed: str | None = None, script: str = KEYS_SCRIPT
) -> Any:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(path), str(REPO), env.get("PYTHONPATH", "")])
    if hash_seed is None:
        env.pop("PYTHONHASHSEED", None)
    else:
        env["PYTHONHASHSEED"] = hash_seed
    done = subprocess.run(
        [sys.executable, "-c", script.format(module=module)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The helper module, importable here and in a subprocess from ``tmp_path``."""
    write_module(tmp_path, "memo_keys_helper", HELPER)
    monkeypatch.delitem(sys.modules, "memo_keys_helper", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module("memo_keys_helper")


# ---------------------------------------------------------------------- call_key


def test_key_is_the_same_in_a_fresh_interpreter(helper: types.ModuleType, tmp_path: Path) -> None:
    """What a re-run finds depends on it: the re-run is another process, with another
    hash seed and other object ids."""
    here = [
        call_key(helper.work, (1,), {}),
        call_key(helper.work, (2,), {"scale": 4}),
        call_key(helper.work, (helper.ARRAY,), {}),
        call_key(helper.work, (helper.ARRAY.copy(),), {}),
    ]
    assert keys_in_fresh_interpreter(tmp_path, "memo_keys_helper") == here


def test_key_is_repeatable_and_depends_on_the_arguments(helper: types.ModuleType) -> None:
    work = helper.work
    assert call_key(work, (1,), {}) == call_key(work, (1,), {})
    keys = {
        call_key(work, (1,), {}),
        call_key(work, (2,), {}),
        call_key(work, (1.0000001,), {}),
        call_key(work, ("1",), {}),
        call_key(work, (1,), {"scale": 3}),
        call_key(work, (1,), {"scale": 4}),
        call_key(work, (), {"x": 1}),
    }
    assert len(keys) == 7


def test_editing_the_body_changes_the_key(tmp_path: Path) -> None:
    """Same module name, same function name, same arguments: only the code differs."""
    before = load_from(
        write_module(tmp_path / "v1", "edited", "def work(x):\n    return x + 1\n"), "edited"
    )
    after = load_from(
        write_module(tmp_path / "v2", "edited", "def work(x):\n    return x + 2\n"), "edited"
    )
    assert before.work.__module__ == after.work.__module__
    assert before.work.__qualname__ == after.work.__qualname__
    assert call_key(before.work, (1,), {}) != call_key(after.work, (1,), {})


def test_editing_a_nested_function_changes_the_key(tmp_path: Path) -> None:
    """A nested function's code is a constant of the outer one's: it counts too."""
    source = "def work(x):\n    def inner(y):\n        return y {op} 1\n    return inner(x)\n"
    before = load_from(write_module(tmp_path / "v1", "nested", source.format(op="+")), "nested")
    after = load_from(write_module(tmp_path / "v2", "nested", source.format(op="-")), "nested")
    assert call_key(before.work, (1,), {}) != call_key(after.work, (1,), {})


def test_comments_and_blank_lines_keep_the_key(tmp_path: Path) -> None:
    """Only what runs counts: moving a function down a file keeps its stored results."""
    plain = "def work(x):\n    return x + 1\n"
    moved = "\n\n# a comment\n\ndef work(x):\n    # why\n\n    return x + 1  # more\n"
    before = load_from(write_module(tmp_path / "v1", "moved", plain), "moved")
    after = load_from(write_module(tmp_path / "v2", "moved", moved), "moved")
    assert before.work.__code__.co_firstlineno != after.work.__code__.co_firstlineno
    assert call_key(before.work, (1,), {}) == call_key(after.work, (1,), {})


def test_defaults_and_closures_are_part_of_the_key() -> None:
    def make(offset: int) -> Any:
        def add(x: int, step: int = 1) -> int:
            return x + step + offset

        return add

    assert call_key(make(1), (1,), {}) == call_key(make(1), (1,), {})
    assert call_key(make(1), (1,), {}) != call_key(make(2), (1,), {})
    with_default = make(1)
    other_default = make(1)
    other_default.__defaults__ = (5,)
    assert call_key(with_default, (1,), {}) != call_key(other_default, (1,), {})


def test_equal_arrays_have_equal_keys(helper: types.ModuleType) -> None:
    a = np.arange(1000, dtype=np.float64)
    assert call_key(helper.work, (a,), {}) == call_key(helper.work, (a.copy(),), {})
    assert call_key(helper.work, (), {"x": a}) == call_key(helper.work, (), {"x": a.copy()})
    changed = a.copy()
    changed[500] += 1e-9
    assert call_key(helper.work, (a,), {}) != call_key(helper.work, (changed,), {})
    assert call_key(helper.work, (a,), {}) != call_key(helper.work, (a.astype(np.float32),), {})
    assert call_key(helper.work, (a,), {}) != call_key(helper.work, (a.reshape(10, 100),), {})


def add(x: int, y: int, *, z: int = 0) -> int:
    return x + y + z


def sub(x: int, y: int, *, z: int = 0) -> int:
    return x - y - z


class Scaler:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def scale(self, x: float) -> float:
        return x * self.factor

    def shift(self, x: float) -> float:
        return x + self.factor


def test_partials_are_keyed_by_their_parts() -> None:
    one = functools.partial(add, 1)
    assert call_key(one, (2,), {}) == call_key(functools.partial(add, 1), (2,), {})
    assert call_key(one, (2,), {}) != call_key(functools.partial(add, 2), (2,), {})
    assert call_key(one, (2,), {}) != call_key(functools.partial(sub, 1), (2,), {})
    assert call_key(functools.partial(add, 1, z=1), (2,), {}) != call_key(
        functools.partial(add, 1, z=2), (2,), {}
    )
    nested = functools.partial(functools.partial(add, 1), 2)
    assert call_key(nested, (), {}) == call_key(
        functools.partial(functools.partial(add, 1), 2), (), {}
    )
    assert call_key(nested, (), {}) != call_key(
        functools.partial(functools.partial(add, 1), 3), (), {}
    )


def test_bound_methods_are_keyed_by_their_function_and_instance() -> None:
    assert call_key(Scaler(2.0).scale, (3,), {}) == call_key(Scaler(2.0).scale, (3,), {})
    assert call_key(Scaler(2.0).scale, (3,), {}) != call_key(Scaler(4.0).scale, (3,), {})
    assert call_key(Scaler(2.0).scale, (3,), {}) != call_key(Scaler(2.0).shift, (3,), {})


def test_an_argument_joblib_cannot_hash_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match=r"hashable by joblib\.hash"):
        call_key(add, (threading.Lock(), 1), {})


SET_CONSTANT = """
def work(x):
    return x in {"alpha", "beta", "gamma", "delta"}
"""

SET_SCRIPT = """
import json
from joblib_azurebatch.memo import call_key
import {module} as helper

print(json.dumps([repr(helper.work.__code__.co_consts), call_key(helper.work, (1,), {{}})]))
"""


def test_a_set_literal_keeps_the_key_across_hash_seeds(tmp_path: Path) -> None:
    write_module(tmp_path, "memo_set_helper", SET_CONSTANT)
    first = keys_in_fresh_interpreter(tmp_path, "memo_set_helper", hash_seed="0", script=SET_SCRIPT)
    second = keys_in_fresh_interpreter(
        tmp_path, "memo_set_helper", hash_seed="1", script=SET_SCRIPT
    )
    assert first[0] != second[0], "both seeds order the set alike: the test shows nothing"
    assert first[1] == second[1]


# ---------------------------------------------------------------------- records


def record(value: Any = None, *, key: str = "k1", job_id: str = "job1") -> bytes:
    return encode_record(
        job_id=job_id,
        task_id="task-7",
        key=key,
        environment=ENV,
        value={"a": [1, 2, 3]} if value is None else value,
        signing_key=job_key(RESULTS_KEY, job_id),
    )


def keys_of(job_id: str) -> bytes:
    return job_key(RESULTS_KEY, job_id)


def test_a_record_verifies_and_returns_its_value() -> None:
    value = {"a": [1, 2, 3], "array": np.arange(5), "f": functools.partial(add, 1)}
    read = read_record(record(value), keys_of, key="k1")
    assert (read.job_id, read.task_id, read.key, read.environment) == (
        "job1",
        "task-7",
        "k1",
        ENV,
    )
    result = read.result()
    assert result["a"] == [1, 2, 3]
    np.testing.assert_array_equal(result["array"], np.arange(5))
    assert result["f"](2) == 3


def test_any_flipped_byte_is_refused() -> None:
    """Every byte: the job id in the clear, the header, the MAC and the body. The reader
    gives every job the same key here, so a changed job id must be caught by the record."""
    data = record()
    assert read_record(data, lambda job: KEY, key="k1").result() == {"a": [1, 2, 3]}
    for index in range(len(data)):
        for mask in (0x01, 0x80):
            altered = bytearray(data)
            altered[index] ^= mask
            with pytest.raises(PayloadError):
                read_record(bytes(altered), lambda job: KEY, key="k1")


def test_a_cut_or_extended_record_is_refused() -> None:
    data = record()
    for cut in (0, 1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(PayloadError):
            read_record(data[:cut], keys_of, key="k1")
    with pytest.raises(PayloadError):
        read_record(data + b"\0", keys_of, key="k1")


def test_a_record_read_for_another_call_is_refused() -> None:
    """Records are found by name: one copied under another call's name must not answer it."""
    with pytest.raises(PayloadError, match="answers call k1"):
        read_record(record(key="k1"), keys_of, key="k2")


def test_a_record_verified_with_another_jobs_key_is_refused() -> None:
    data = record(job_id="job1")
    with pytest.raises(PayloadError, match="signature"):
        read_record(data, lambda job: OTHER_KEY, key="k1")
    with pytest.raises(PayloadError, match="signature"):
        read_record(data, lambda job: job_key(b"another container", job), key="k1")


def test_a_record_signed_with_another_jobs_key_under_this_job_id_is_refused() -> None:
    forged = encode_record(
        job_id="job1", task_id="t", key="k1", environment=ENV, value=1, signing_key=OTHER_KEY
    )
    with pytest.raises(PayloadError, match="signature"):
        read_record(forged, keys_of, key="k1")


# ---------------------------------------------------------------------- Memo


class Store:
    """A task's blob access, in memory: ``read`` answers None for a missing blob."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.writes: list[str] = []

    def read(self, ref: str) -> bytes | None:
        return self.blobs.get(ref)

    def write(self, ref: str, data: bytes) -> None:
        self.writes.append(ref)
        self.blobs[ref] = data

    def context(
        self, *, job_id: str = "job1", task_id: str = "task-1", signing_key: bytes = KEY
    ) -> TaskContext:
        return TaskContext(
            job_id=job_id,
            task_id=task_id,
            signing_key=signing_key,
            read=self.read,
            write=self.write,
        )


class Counted:
    """The calls of one test: each run is appended to ``ran``."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.ran: list[int] = []
        self.fail_at = fail_at

    def square(self, x: int) -> dict[str, int]:
        self.ran.append(x)
        if x == self.fail_at:
            raise ZeroDivisionError(f"call {x} fails")
        return {"x": x, "square": x * x}


def batch(counted: Counted, n: int) -> BatchedCalls:
    return BatchedCalls([(counted.square, (i,), {}) for i in range(n)], (SequentialBackend(), 1))


def keys_for(n: int) -> list[str]:
    return [call_key(add, (i, 0), {}) for i in range(n)]


def memo_for(counted: Counted, n: int, refs: list[str | None] | None = None) -> Memo:
    keys = keys_for(n)
    if refs is None:
        refs = [record_blob(k) for k in keys]
    return Memo(batch(counted, n), keys, refs, ENV)


def expected(n: int) -> list[dict[str, int]]:
    return [{"x": i, "square": i * i} for i in range(n)]


def test_memo_runs_every_call_and_stores_one_record_each() -> None:
    store, counted = Store(), Counted()
    calls = memo_for(counted, 4)
    with task_context(store.context()):
        assert calls() == expected(4)
    assert counted.ran == [0, 1, 2, 3]
    assert sorted(store.writes) == sorted(calls.refs)
    for index, (key, ref) in enumerate(zip(calls.keys, calls.refs, strict=True)):
        assert ref is not None
        stored = read_record(store.blobs[ref], keys_of, key=key)
        assert (stored.job_id, stored.task_id, stored.environment) == ("job1", "task-1", ENV)
        assert stored.result() == expected(4)[index]
    assert len(calls.calls) == 4
    assert [a for _, a, _ in calls.calls.items] == [(0,), (1,), (2,), (3,)]
    assert memo._CONTEXT.get() is None


def test_a_second_attempt_takes_every_stored_call() -> None:
    """A retried or preempted task: what its earlier attempt finished is not run again."""
    store = Store()
    first = Counted()
    with task_context(store.context(task_id="task-1")):
        values = memo_for(first, 5)()
    again = Counted()
    with task_context(store.context(task_id="task-1")):
        assert memo_for(again, 5)() == values == expected(5)
    assert again.ran == []
    assert len(store.writes) == 5


def test_a_second_attempt_runs_only_what_is_missing_at_the_end() -> None:
    store = Store()
    with task_context(store.context()):
        memo_for(Counted(), 5)()
    for ref in [record_blob(k) for k in keys_for(5)][3:]:
        del store.blobs[ref]
    again = Counted()
    with task_context(store.context()):
        assert memo_for(again, 5)() == expected(5)
    assert again.ran == [3, 4]


def test_calls_after_the_first_missing_record_run_again() -> None:
    """Calls run in order, so an attempt only looks for the records of a prefix."""
    store = Store()
    with task_context(store.context()):
        memo_for(Counted(), 4)()
    del store.blobs[record_blob(keys_for(4)[1])]
    again = Counted()
    with task_context(store.context()):
        assert memo_for(again, 4)() == expected(4)
    assert again.ran == [1, 2, 3]


@pytest.mark.parametrize(
    ("job_id", "signing_key"),
    [("job2", OTHER_KEY), ("job1", OTHER_KEY), ("job2", KEY)],
    ids=["other-job", "other-key", "other-job-id"],
)
def test_records_of_another_job_are_not_taken(job_id: str, signing_key: bytes) -> None:
    """A node holds its own job's key only: it cannot tell an earlier job's record from
    a forged one, so it runs the call again (the client takes such records, not the node)."""
    store = Store()
    with task_context(store.context(job_id="job1", signing_key=KEY)):
        memo_for(Counted(), 3)()
    again = Counted()
    with task_context(store.context(job_id=job_id, signing_key=signing_key)):
        assert memo_for(again, 3)() == expected(3)
    assert again.ran == [0, 1, 2]
    for key in keys_for(3):
        stored = read_record(store.blobs[record_blob(key)], lambda job: signing_key, key=key)
        assert stored.job_id == job_id


def test_records_of_another_environment_are_not_taken() -> None:
    store = Store()
    with task_context(store.context()):
        memo_for(Counted(), 3)()
    again = Counted()
    other = Memo(batch(again, 3), keys_for(3), [record_blob(k) for k in keys_for(3)], "env-2")
    with task_context(store.context()):
        assert other() == expected(3)
    assert again.ran == [0, 1, 2]


def test_unreadable_records_are_run_again() -> None:
    store = Store()
    keys = keys_for(3)
    store.blobs[record_blob(keys[0])] = b"not a record"
    store.blobs[record_blob(keys[1])] = b""
    counted = Counted()
    with task_context(store.context()):
        assert memo_for(counted, 3)() == expected(3)
    assert counted.ran == [0, 1, 2]
    assert (
        read_record(store.blobs[record_blob(keys[0])], keys_of, key=keys[0]).result()
        == (expected(3)[0])
    )


def test_calls_without_a_ref_are_skipped() -> None:
    """The client has those results already: the task neither runs nor stores them."""
    store, counted = Store(), Counted()
    keys = keys_for(5)
    refs: list[str | None] = [None, record_blob(keys[1]), None, None, record_blob(keys[4])]
    with task_context(store.context()):
        out = memo_for(counted, 5, refs)()
    assert out == [SKIPPED, expected(5)[1], SKIPPED, SKIPPED, expected(5)[4]]
    assert counted.ran == [1, 4]
    assert sorted(store.blobs) == sorted([record_blob(keys[1]), record_blob(keys[4])])


def test_skipped_calls_do_not_stop_the_lookup() -> None:
    store = Store()
    keys = keys_for(4)
    refs: list[str | None] = [None, *[record_blob(k) for k in keys[1:]]]
    with task_context(store.context()):
        memo_for(Counted(), 4, refs)()
    again = Counted()
    with task_context(store.context()):
        assert memo_for(again, 4, refs)() == [SKIPPED, *expected(4)[1:]]
    assert again.ran == []


def test_without_a_task_context_calls_run_and_nothing_is_stored() -> None:
    store, counted = Store(), Counted()
    assert memo._CONTEXT.get() is None
    calls = memo_for(counted, 3, [None, record_blob("a"), record_blob("b")])
    assert calls() == [SKIPPED, *expected(3)[1:]]
    assert counted.ran == [1, 2]
    assert store.blobs == {}


def test_a_failing_call_propagates_and_earlier_calls_keep_their_records() -> None:
    store, counted = Store(), Counted(fail_at=2)
    calls = memo_for(counted, 4)
    with task_context(store.context()), pytest.raises(ZeroDivisionError, match="call 2 fails"):
        calls()
    assert counted.ran == [0, 1, 2]
    keys = keys_for(4)
    assert sorted(store.blobs) == sorted(record_blob(k) for k in keys[:2])
    for index in range(2):
        data = store.blobs[record_blob(keys[index])]
        assert read_record(data, keys_of, key=keys[index]).result() == expected(4)[index]
    assert len(calls.calls.items) == 4

    retried = Counted()
    with task_context(store.context()):
        assert memo_for(retried, 4)() == expected(4)
    assert retried.ran == [2, 3]


def test_a_failing_write_keeps_the_values(capsys: pytest.CaptureFixture[str]) -> None:
    """Storing is a bonus: the task's own result still carries every value."""
    store, counted = Store(), Counted()

    def refuse(ref: str, data: bytes) -> None:
        raise OSError("storage is down")

    context = TaskContext(
        job_id="job1", task_id="task-1", signing_key=KEY, read=store.read, write=refuse
    )
    with task_context(context):
        assert memo_for(counted, 3)() == expected(3)
    assert counted.ran == [0, 1, 2]
    assert "storage is down" in capsys.readouterr().err


def test_task_context_is_reset_after_an_error() -> None:
    with pytest.raises(RuntimeError), task_context(Store().context()):
        assert memo._CONTEXT.get() is not None
        raise RuntimeError
    assert memo._CONTEXT.get() is None


# ---------------------------------------------------------------------- Plan


def test_merge_puts_stored_values_in_the_skipped_places() -> None:
    plan = Plan(keys=["a", "b", "c", "d"], found={0: "stored-a", 2: ["stored", "c"]})
    assert not plan.complete
    assert plan.merge([SKIPPED, "b", SKIPPED, {"d": 4}]) == [
        "stored-a",
        "b",
        ["stored", "c"],
        {"d": 4},
    ]


def test_merge_refuses_a_wrong_length() -> None:
    plan = Plan(keys=["a", "b"], found={0: 1})
    with pytest.raises(PayloadError, match="1 results for 2 calls"):
        plan.merge([SKIPPED])
    with pytest.raises(PayloadError, match="3 results for 2 calls"):
        plan.merge([SKIPPED, 2, 3])


def test_a_complete_plan_has_every_value_in_order() -> None:
    plan = Plan(keys=["a", "b"], found={1: "B", 0: "A"})
    assert plan.complete
    assert plan.values() == ["A", "B"]


def test_memo_and_plan_together_give_every_result() -> None:
    """What a resumable batch answers: stored values for the skipped calls, computed
    values for the others, in joblib's order."""
    store, counted = Store(), Counted()
    keys = keys_for(4)
    plan = Plan(keys=keys, found={1: expected(4)[1], 3: expected(4)[3]})
    refs = [None if i in plan.found else record_blob(k) for i, k in enumerate(keys)]
    with task_context(store.context()):
        computed = memo_for(counted, 4, refs)()
    assert counted.ran == [0, 2]
    assert plan.merge(computed) == expected(4)


@pytest.mark.parametrize(
    "value",
    [np.float64(0.5), np.arange(2), np.arange(3)],
    ids=["scalar", "array-2", "array-3"],
)
def test_merge_takes_numpy_values(value: Any) -> None:
    plan = Plan(keys=["a", "b"], found={0: "stored"})
    merged = plan.merge([SKIPPED, value])
    assert merged[0] == "stored"
    assert merged[1] is value


def test_a_large_argument_is_hashed_once_per_batch_and_keys_alike_without_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A KFold loop's X is an argument of every call of a batch: hashing it once per call
    would cost as much as the calls at 1 GB/s. The shared digest must not change the key."""
    import joblib

    from joblib_azurebatch import memo

    big = np.arange(300_000, dtype=np.float64)  # 2.4 MB, above the 1 MiB threshold
    without_cache = [memo.call_key(take_row, (big, i), {}) for i in range(3)]
    hashed: list[int] = []
    real_hash = joblib.hash

    def counting(obj: object, *args: object, **kwargs: object) -> str:
        if obj is big:
            hashed.append(1)
        return real_hash(obj, *args, **kwargs)

    monkeypatch.setattr(memo.joblib, "hash", counting)
    cache: dict[int, tuple[object, str]] = {}
    with_cache = [memo.call_key(take_row, (big, i), {}, cache) for i in range(3)]
    assert with_cache == without_cache
    assert len(hashed) == 1
    changed = big.copy()
    changed[0] = -1.0
    assert memo.call_key(take_row, (changed, 0), {}, cache) != with_cache[0]


def take_row(data: np.ndarray, index: int) -> float:
    return float(data[index])


def test_a_changed_signature_changes_the_key() -> None:
    """``f(x, y)`` and ``f(x, *y)`` have the same bytecode but answer ``f(1, 2)``
    differently: a stored result of one must not be taken for the other."""
    namespace: dict[str, object] = {}
    exec("def f(x, y):\n    return (x, y)\n", namespace)
    two = namespace["f"]
    exec("def f(x, *y):\n    return (x, y)\n", namespace)
    star = namespace["f"]
    exec("def f(x, **y):\n    return (x, y)\n", namespace)
    stars = namespace["f"]
    keys = {memo_call_key(f) for f in (two, star, stars)}
    assert len(keys) == 3


def memo_call_key(func: object) -> str:
    from joblib_azurebatch.memo import call_key

    return call_key(func, (1, 2), {})


def test_the_results_key_comes_from_the_account_key_when_the_client_has_it() -> None:
    """With the storage account key, nothing is stored: a reader or writer of the container
    cannot learn the key that signs stored results. Without it (Entra ID) a random key is
    stored once, and every client of the container reads the same one."""
    from joblib_azurebatch.memo import RESULTS_KEY_BLOB
    from joblib_azurebatch.resume import results_key
    from tests.fakes import MemoryStore

    keyed = MemoryStore()
    keyed.account_secret = b"s" * 32
    assert results_key(keyed) == results_key(keyed)
    assert RESULTS_KEY_BLOB not in keyed.blobs
    other = MemoryStore()
    other.account_secret = b"t" * 32
    assert results_key(other) != results_key(keyed)

    signed_in = MemoryStore()
    first = results_key(signed_in)
    assert signed_in.blobs[RESULTS_KEY_BLOB] == first
    assert results_key(signed_in) == first
    assert len(first) == 32

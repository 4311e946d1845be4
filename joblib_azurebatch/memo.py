"""Per-call results that outlive their task and their job: what `resume` stands on.

With ``BatchConfig(resume=True)`` every call gets a key: `joblib.hash` (what
``joblib.Memory`` uses: stable across processes, fast on arrays, and indifferent to object
ids) of the function's code and of its arguments. The node stores each call's result
under ``results/{key}`` as soon as the call returns, in a record signed with the job's key.
Then:

- a client that died loses nothing that finished: the same script run again finds the
  records of its calls, takes them, and submits only the calls that have none;
- a task that Batch runs again (a preempted spot node, a retry) skips the calls its earlier
  attempt finished, so a preemption costs the call that was running, not the task;
- a call whose code or arguments changed has another key, and runs again.

A job of a resumable run signs with a key derived from the container's *results key*
(`job_key`; see `resume.results_key`: derived from the storage account key when the client
has it, else a random blob), so a later client can verify the records of any earlier job
without the keys the dead client took with it. A record names its job, its task and its
call key, and is refused when its job or call differs from what it is read for; it holds
the environment it was computed in (`environment_fingerprint`), and a record from another
environment is not reused unless ``BatchConfig(resume_any_environment=True)`` says so.

The node side is `Memo`: the callable a task runs instead of joblib's ``BatchedCalls``,
calling each item on its own and storing its record through the worker's task context
(`TaskContext`). This module is imported on the node: it imports no Azure SDK.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import hmac
import importlib.metadata
import inspect
import io
import pickle
import queue
import sys
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import cloudpickle
import joblib

from .errors import PayloadError

__all__ = [
    "RECORD_MAGIC",
    "RESULTS_KEY_BLOB",
    "RESULTS_PREFIX",
    "CallRecord",
    "Memo",
    "TaskContext",
    "call_key",
    "encode_record",
    "environment_fingerprint",
    "job_key",
    "read_record",
    "record_blob",
    "task_context",
]

RESULTS_PREFIX = "results/"
#: The container's secret from which every resumable job's signing key is derived.
RESULTS_KEY_BLOB = "joblib-azurebatch/results-key"
RECORD_MAGIC = b"JABC"
_RECORD_VERSION = 1
_HEADER = 4 + 1 + 32


def record_blob(key: str) -> str:
    """Where the result of the call ``key`` is stored, whichever job computed it."""
    return f"{RESULTS_PREFIX}{key}"


def job_key(results_key: bytes, job_id: str) -> bytes:
    """The signing key of the resumable job ``job_id``: anyone who can read the results key
    (the account's credentials) can verify that job's records; a node gets only this."""
    return hmac.new(results_key, b"joblib-azurebatch job " + job_id.encode(), "sha256").digest()


# ---------------------------------------------------------------------- keys


def _const(const: Any) -> Any:
    """A code constant as text that is the same in every process: a set literal is a
    frozenset, whose repr follows the string hash seed, so its items are sorted."""
    if isinstance(const, types.CodeType):
        return _code_digest(const)
    if isinstance(const, frozenset):
        return ("frozenset", sorted(repr(_const(c)) for c in const))
    if isinstance(const, tuple):
        return tuple(_const(c) for c in const)
    return repr(const)


def _code_digest(code: types.CodeType) -> str:
    """The function's own code, not its place: bytecode, constants (nested functions' code
    too), names. A comment or a blank line does not change it; an edit of the function's
    body does. What it reads from module globals, and the helpers it calls, are not part
    of it (as with ``joblib.Memory``): after changing those, change the call or run
    without ``resume``."""
    parts: list[Any] = [
        code.co_code,
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        # The signature: f(x, y) and f(x, *y) run the same bytecode on other arguments.
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
    ]
    parts.extend(_const(const) for const in code.co_consts)
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _identity(func: Any, depth: int = 0) -> Any:
    """What a callable computes, as plain data for `joblib.hash`: its code (and what it
    closes over, its defaults) for a function, recursively for what wraps one."""
    if depth > 8:
        return repr(type(func))
    if isinstance(func, functools.partial):
        return ("partial", _identity(func.func, depth + 1), func.args, func.keywords)
    if inspect.ismethod(func):
        return ("method", _identity(func.__func__, depth + 1), func.__self__)
    if inspect.isfunction(func):
        closure = tuple(c.cell_contents for c in func.__closure__ or () if _filled(c))
        return (
            "function",
            func.__module__,
            func.__qualname__,
            _code_digest(func.__code__),
            func.__defaults__,
            func.__kwdefaults__,
            closure,
        )
    # A callable object (scikit-learn wraps every function it hands to joblib): its type's
    # code, its state, and the code of the functions it holds.
    state = getattr(func, "__dict__", {})
    held = tuple(
        (name, _identity(value, depth + 1))
        for name, value in sorted(state.items())
        if inspect.isfunction(value) or isinstance(value, functools.partial)
    )
    call = vars(type(func)).get("__call__")
    code = _code_digest(call.__code__) if inspect.isfunction(call) else ""
    return ("object", type(func).__module__, type(func).__qualname__, code, held, func)


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


#: A top-level argument with at least this many bytes in one buffer (an array, bytes) is
#: hashed on its own, once per `call_key` cache: a KFold loop's ``X`` is shared by every
#: call of a batch, and hashing it runs at about 1 GB/s.
_BIG_ARGUMENT = 1 << 20


def _digest(value: Any, cache: dict[int, tuple[Any, str]]) -> Any:
    if isinstance(value, bytes | bytearray):
        size: object = len(value)
    else:
        size = getattr(value, "nbytes", None)
    if not isinstance(size, int) or size < _BIG_ARGUMENT:
        return value
    held = cache.get(id(value))
    if held is None or held[0] is not value:
        held = (value, str(joblib.hash(value)))
        cache[id(value)] = held
    return ("joblib-azurebatch-digest", held[1])


def call_key(
    func: Any,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    cache: dict[int, tuple[Any, str]] | None = None,
) -> str:
    """The key of one call: the same function code with the same arguments, in any
    process, has the same key; `PayloadError` if an argument cannot be hashed.

    ``cache`` (kept by the caller for the calls it keys together, never longer: an array
    changed in place between two batches must be hashed again) holds the digests of the
    large top-level arguments already hashed, with the objects themselves, so that an id
    reused by another object is not mistaken for it.
    """
    held = cache if cache is not None else {}
    try:
        args = tuple(_digest(a, held) for a in args)
        kwargs = {k: _digest(v, held) for k, v in kwargs.items()}
        return str(joblib.hash((_identity(func), args, kwargs)))
    except Exception as e:
        raise PayloadError(
            f"resume=True needs every call's arguments to be hashable by joblib.hash: "
            f"{type(e).__name__}: {e}"
        ) from e


@functools.lru_cache(maxsize=1)
def _distributions() -> str:
    names = sorted(
        f"{(d.metadata['Name'] or '').lower()}=={d.version}"
        for d in importlib.metadata.distributions()
    )
    return "\n".join(names)


def environment_fingerprint(image: str = "") -> str:
    """The environment a result was computed in: Python, every installed distribution and
    its version (the default path installs the client's own on the nodes), and the node
    image. Any upgrade changes it."""
    text = f"{sys.version_info[:2]}\n{image}\n{_distributions()}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------- records


@dataclass(frozen=True)
class CallRecord:
    """A verified result of one call."""

    job_id: str
    task_id: str
    key: str
    environment: str
    written: str
    value: bytes
    #: The run (the key of its first call) whose task computed it.
    run: str = ""

    def result(self) -> Any:
        return pickle.loads(self.value)


def encode_record(
    *,
    job_id: str,
    task_id: str,
    key: str,
    environment: str,
    value: Any,
    signing_key: bytes,
    run: str = "",
) -> bytes:
    """``len(job_id) | job_id | MAGIC | version | HMAC | body``: the job id comes first, in
    the clear, so that a reader knows which job's key verifies the rest."""
    body = pickle.dumps(
        {
            "job_id": job_id,
            "task_id": task_id,
            "key": key,
            "environment": environment,
            "run": run,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "value": cloudpickle.dumps(value),
        },
        protocol=4,
    )
    head = RECORD_MAGIC + bytes([_RECORD_VERSION])
    mac = hmac.new(signing_key, head + body, "sha256").digest()
    job = job_id.encode()
    return bytes([len(job)]) + job + head + mac + body


class _Plain(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a call record holds plain data only, not {module}.{name}")


def read_record(data: bytes, key_of: Callable[[str], bytes], *, key: str) -> CallRecord:
    """Verify a record read for the call ``key``; ``key_of(job_id)`` is that job's signing
    key. `PayloadError` unless the MAC holds and the record is that call's. Nothing of the
    user's is unpickled here (`CallRecord.result` does, after)."""
    try:
        size = data[0]
        job_id = data[1 : 1 + size].decode()
        rest = data[1 + size :]
    except (IndexError, UnicodeDecodeError) as e:
        raise PayloadError(f"the stored result of call {key} is not a record") from e
    head, mac, body = rest[:5], rest[5:_HEADER], rest[_HEADER:]
    if head != RECORD_MAGIC + bytes([_RECORD_VERSION]):
        raise PayloadError(f"the stored result of call {key} is not a record of this version")
    expected = hmac.new(key_of(job_id), head + body, "sha256").digest()
    if not hmac.compare_digest(mac, expected):
        raise PayloadError(
            f"the stored result of call {key} fails its signature: it was altered, or not "
            "written by a task of this account's runs; it is not used"
        )
    fields = _Plain(io.BytesIO(body)).load()
    if fields.get("job_id") != job_id or fields.get("key") != key:
        raise PayloadError(
            f"the stored result read for call {key} answers call {fields.get('key')} of job "
            f"{fields.get('job_id')}; it is not used"
        )
    return CallRecord(
        job_id=job_id,
        task_id=str(fields["task_id"]),
        key=key,
        environment=str(fields["environment"]),
        written=str(fields["written"]),
        value=bytes(fields["value"]),
        run=str(fields.get("run", "")),
    )


# ---------------------------------------------------------------------- the node side


@dataclass(frozen=True)
class TaskContext:
    """What the worker lends a task's `Memo`: its ids, its key, and its blob access (a
    reference is a SAS URL, or a blob name in node-identity mode; ``read`` returns None
    for a blob that does not exist)."""

    job_id: str
    task_id: str
    signing_key: bytes
    read: Callable[[str], bytes | None]
    write: Callable[[str, bytes], None]


_CONTEXT: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "joblib_azurebatch_task", default=None
)


@contextlib.contextmanager
def task_context(context: TaskContext) -> Iterator[None]:
    """Lend ``context`` to the `Memo` objects the task runs."""
    token = _CONTEXT.set(context)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


#: Stands, in what a `Memo` returns, for a call the client already has the result of.
SKIPPED = ("joblib-azurebatch", "skipped")


class Memo:
    """One joblib batch of a resumable run, as the node runs it: call by call, each
    result stored as its call returns (by a background thread, so the next call runs
    meanwhile), the calls an earlier attempt of the task finished taken from their
    records instead of run again.

    ``refs[i]`` is where call ``i``'s record goes, or None for a call the client has the
    result of already (its place in the returned list holds `SKIPPED`).
    """

    def __init__(
        self,
        calls: Any,
        keys: Sequence[str],
        refs: Sequence[str | None],
        environment: str,
        run: str = "",
    ) -> None:
        self.calls = calls
        self.keys = list(keys)
        self.refs = list(refs)
        self.environment = environment
        self.run = run

    def __len__(self) -> int:
        return len(self.keys)

    def _earlier(self, context: TaskContext, index: int) -> tuple[bool, Any]:
        """The result an earlier attempt of this task stored for call ``index``, if any."""
        ref = self.refs[index]
        if ref is None:
            return False, None
        try:
            data = context.read(ref)
            if data is None:
                return False, None
            own = {context.job_id: context.signing_key}
            record = read_record(data, lambda job: own.get(job, b""), key=self.keys[index])
            if record.environment != self.environment:
                return False, None
            return True, record.result()
        except Exception:  # not ours, not readable: the call runs again
            return False, None

    def __call__(self) -> list[Any]:
        context = _CONTEXT.get()
        items = list(self.calls.items)
        out: list[Any] = []
        uploads: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        failures: list[BaseException] = []

        def upload() -> None:
            while (item := uploads.get()) is not None:
                if context is None or failures:
                    continue
                try:
                    context.write(*item)
                except Exception as e:  # the task's own result still carries the value
                    failures.append(e)

        uploader = threading.Thread(target=upload, name="azurebatch-records", daemon=True)
        uploader.start()
        # Calls run in order, so what an earlier attempt finished is a prefix: look until
        # the first call without a record.
        looking = context is not None
        try:
            for index, item in enumerate(items):
                ref = self.refs[index]
                if ref is None:
                    out.append(SKIPPED)
                    continue
                if looking and context is not None:
                    found, value = self._earlier(context, index)
                    if found:
                        out.append(value)
                        continue
                    looking = False
                self.calls.items = [item]
                value = self.calls()[0]
                out.append(value)
                if context is not None:
                    record = encode_record(
                        job_id=context.job_id,
                        task_id=context.task_id,
                        key=self.keys[index],
                        environment=self.environment,
                        value=value,
                        signing_key=context.signing_key,
                        run=self.run,
                    )
                    uploads.put((ref, record))
        finally:
            self.calls.items = items
            uploads.put(None)
            uploader.join()
        if failures:
            print(
                f"[joblib-azurebatch worker] storing a call's result failed: {failures[0]}; "
                "the task's result carries every value",
                file=sys.stderr,
                flush=True,
            )
        return out

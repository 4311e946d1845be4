"""What travels between the client and a node: signed task and result envelopes.

Both envelopes are ``MAGIC (4) | version (1) | HMAC-SHA256 (32) | body``; the MAC covers
magic, version and body, and is checked before a single byte of the body is unpickled, so
a node never unpickles what the client did not sign (and the client never unpickles a
result that its own task did not write). The body is a plain pickle of a dict of plain
types, read with an unpickler that refuses every global; the user's objects inside it are
cloudpickle bytes that are only unpickled after the Python, cloudpickle and joblib versions
were found equal on both sides. See docs/internals.md for the fields.

Both envelopes are bound to their task. A task envelope names its job and task, and the
worker refuses one whose ids differ from the ``AZ_BATCH_JOB_ID`` and ``AZ_BATCH_TASK_ID``
that Batch sets on the node (`check_task_binding`); a result envelope names the job, the
task and the attempt that wrote it, and the client refuses one read for another task
(`read_result`). The MAC alone proves only that the envelope comes from this job: without
the binding, whoever may write to the container could swap two tasks' payload blobs (each
task would run the other's calls) or two result blobs (the client would hand back the
wrong values), and every signature would still verify.

Large arguments are not copied into every task. Every top-level argument of a call (a
positional argument, a keyword value) and the callable itself (the instance of a bound
method, the function and arguments of a ``functools.partial``) whose pickle is at least
``inline_threshold`` bytes, whatever its type, and every numpy array or bytes of that size
elsewhere in the calls, is pickled on its own and replaced in the calls by the persistent id
``("joblib-azurebatch-object", sha256)`` of those bytes. The digest is always taken from the
bytes a task sends, so an array changed in place is sent with its new content, and the
writer keeps no reference to the user's objects once a task is prepared.

Where the bytes travel is decided for the tasks prepared together (`PayloadWriter.store`,
one submitter flush): an object that several calls of the flush share, or that the job sent
before, is stored once per job under ``jobs/{job_id}/objects/{sha256}`` and the task gets a
read-only SAS URL for it (in node-identity mode, its blob name); an object that one call
alone uses travels inside that task's signed payload (``inline``), since a separate blob
would cost a request and save nothing. The sha256 travels inside the signed payload, so the
worker verifies every object, inline, downloaded or found in its node cache, before
unpickling it.

Warning classes that cloudpickle would send by reference travel as ``(module, qualname,
builtin base)`` instead: scikit-learn ships the caller's ``warnings.filters`` with every call,
and a filter on a class from a module the image lacks (pytest's, a notebook extension's)
would otherwise stop every task with ``ModuleNotFoundError`` before the user's code.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib
import inspect
import io
import linecache
import pickle
import re
import secrets
import sys
import threading
import traceback
import types
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, runtime_checkable

import cloudpickle
import joblib

from joblib_azurebatch.bundle import Bundle
from joblib_azurebatch.errors import PayloadError, RemoteError, VersionMismatchError
from joblib_azurebatch.forks import ForkSafeLock
from joblib_azurebatch.memo import Memo

__all__ = [
    "CONTAINER_URL_ENV",
    "ENVELOPE_VERSION",
    "KEY_BLOB_ENV",
    "NODE_IDENTITY_ENV",
    "OBJECT_TAG",
    "PAYLOAD_BLOB_ENV",
    "PAYLOAD_URL_ENV",
    "RESULT_BLOB_ENV",
    "RESULT_MAGIC",
    "RESULT_URL_ENV",
    "SIGNING_KEY_ENV",
    "TASK_MAGIC",
    "DumpedTask",
    "Mapper",
    "NodeIdentityStore",
    "ObjectStore",
    "PayloadWriter",
    "PreparedTask",
    "RemoteTraceback",
    "ResultEnvelope",
    "TaskEnvelope",
    "check_task_binding",
    "check_versions",
    "decode_task",
    "encode_result",
    "job_prefix",
    "key_blob",
    "load_calls",
    "new_attempt",
    "new_signing_key",
    "node_identity_of",
    "object_blob",
    "payload_blob",
    "read_result",
    "result_blob",
    "task_keys",
    "versions",
    "warning_record",
    "with_source_lines",
]

TASK_MAGIC = b"JABT"
RESULT_MAGIC = b"JABR"
#: 3: a task envelope carries the objects that only its own calls use (``inline``).
#: 2: a result envelope names its job and attempt, and both envelopes are checked
#: against the task they are read for (1 had neither check).
ENVELOPE_VERSION = 3
OBJECT_TAG = "joblib-azurebatch-object"
_HEADER = 4 + 1 + 32
# The body of an envelope is plain data; protocol 4 keeps it readable by any Python >= 3.8.
_BODY_PROTOCOL = 4

PAYLOAD_URL_ENV = "JOBLIB_AZUREBATCH_PAYLOAD_URL"
RESULT_URL_ENV = "JOBLIB_AZUREBATCH_RESULT_URL"
SIGNING_KEY_ENV = "JOBLIB_AZUREBATCH_SIGNING_KEY"
#: Node-identity mode (``BatchConfig.node_identity``): names, not capabilities. The nodes
#: reach the container as the pool's managed identity (its ARM resource id in
#: ``NODE_IDENTITY_ENV``, the variable ``BatchConfig.from_env`` reads it from too).
CONTAINER_URL_ENV = "JOBLIB_AZUREBATCH_CONTAINER_URL"
PAYLOAD_BLOB_ENV = "JOBLIB_AZUREBATCH_PAYLOAD_BLOB"
RESULT_BLOB_ENV = "JOBLIB_AZUREBATCH_RESULT_BLOB"
KEY_BLOB_ENV = "JOBLIB_AZUREBATCH_KEY_BLOB"
NODE_IDENTITY_ENV = "JOBLIB_AZUREBATCH_NODE_IDENTITY"


# ---------------------------------------------------------------------- blob layout


def job_prefix(job_id: str) -> str:
    """Every blob of a job lives under this prefix, so cleanup is one `delete_prefix`."""
    return f"jobs/{job_id}/"


def object_blob(job_id: str, sha256: str) -> str:
    """The content-addressed blob of one large argument."""
    return f"jobs/{job_id}/objects/{sha256}"


def payload_blob(job_id: str, task_id: str) -> str:
    """The signed task envelope a task downloads."""
    return f"jobs/{job_id}/tasks/{task_id}/payload"


def result_blob(job_id: str, task_id: str) -> str:
    """The signed result envelope a task uploads."""
    return f"jobs/{job_id}/tasks/{task_id}/result"


def key_blob(job_id: str) -> str:
    """The job's signing key, in node-identity mode only (else it is in each task's
    environment settings): readable by the pool's identity, never named in a task as a
    capability."""
    return f"jobs/{job_id}/key"


def new_signing_key() -> bytes:
    """A fresh random per-job HMAC key (32 bytes)."""
    return secrets.token_bytes(32)


# ---------------------------------------------------------------------- versions


def versions() -> dict[str, str]:
    """The versions that must agree for cloudpickle bytes to load on the other side."""
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "cloudpickle": str(cloudpickle.__version__),
        "joblib": str(joblib.__version__),
    }


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def check_versions(client: Mapping[str, str]) -> None:
    """Raise `VersionMismatchError` unless this interpreter can load the client's pickles.

    The Python minor version and the cloudpickle version must be equal (cloudpickle only
    promises to load what the same version dumped); joblib must agree on major.minor
    (``BatchedCalls`` is pickled with its private layout).
    """
    mine = versions()
    differs = [
        name
        for name, same in (
            ("python", client.get("python") == mine["python"]),
            ("cloudpickle", client.get("cloudpickle") == mine["cloudpickle"]),
            ("joblib", _minor(client.get("joblib", "")) == _minor(mine["joblib"])),
        )
        if not same
    ]
    if not differs:
        return

    def show(v: Mapping[str, str]) -> str:
        return ", ".join(f"{k} {v.get(k, '?')}" for k in ("python", "cloudpickle", "joblib"))

    pins = " ".join(f"{k}=={client.get(k, '?')}" for k in ("cloudpickle", "joblib"))
    raise VersionMismatchError(
        f"The worker image runs {show(mine)} but the client runs {show(client)} "
        f"(different: {', '.join(differs)}); cloudpickle cannot move code between them. "
        f"Leave BatchConfig(image=...) unset to let the nodes install the client's own "
        f"versions (base_image=, if set, must be Python {client.get('python', '?')}); or "
        f"build your image for the client: `docker build --build-arg "
        f"PYTHON_VERSION={client.get('python', '?')} -f docker/Dockerfile .` (see "
        f"docker/README.md), or `pip install {pins}` in it on Python "
        f"{client.get('python', '?')}."
    )


# ---------------------------------------------------------------------- envelopes


class _PlainUnpickler(pickle.Unpickler):
    """Loads only plain containers and scalars: an envelope body names no class."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"envelope bodies hold plain data, not {module}.{name}")


def _seal(magic: bytes, body: dict[str, Any], key: bytes) -> bytes:
    data = pickle.dumps(body, protocol=_BODY_PROTOCOL)
    head = magic + bytes([ENVELOPE_VERSION])
    mac = hmac.new(key, head + data, hashlib.sha256).digest()
    return head + mac + data


def _unseal(magic: bytes, data: bytes, key: bytes, *, what: str) -> dict[str, Any]:
    if len(data) < _HEADER or data[:4] != magic:
        raise PayloadError(f"This is not a joblib-azurebatch {what} (wrong magic bytes)")
    version = data[4]
    if version != ENVELOPE_VERSION:
        age = "an older" if version < ENVELOPE_VERSION else "a newer"
        raise PayloadError(
            f"The {what} has envelope version {version}, this side reads version "
            f"{ENVELOPE_VERSION} ({age} release of joblib-azurebatch wrote it): the client "
            "and the worker image run different releases of joblib-azurebatch; install the "
            "same release in both. Nothing in it was unpickled"
        )
    mac, body = data[5:_HEADER], data[_HEADER:]
    expected = hmac.new(key, data[:5] + body, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise PayloadError(
            f"The {what} failed signature verification (tampered with, truncated, or signed "
            "with another job's key); it was not unpickled"
        )
    try:
        loaded = _PlainUnpickler(io.BytesIO(body)).load()
    except Exception as e:
        raise PayloadError(f"The {what} body is not plain data: {e}") from e
    if not isinstance(loaded, dict):
        raise PayloadError(f"The {what} body is not a dict")
    return loaded


# ---------------------------------------------------------------------- client: writing


class ObjectStore(Protocol):
    """What `PayloadWriter` needs from storage (`storage.BlobStore` provides it)."""

    def upload(self, name: str, data: bytes, *, overwrite: bool = True) -> None: ...

    def upload_if_absent(self, name: str, data: bytes) -> bool: ...

    def download(self, name: str) -> bytes: ...

    def sas_url(
        self, name: str, *, read: bool = False, write: bool = False, expiry: timedelta
    ) -> str: ...


@runtime_checkable
class NodeIdentityStore(ObjectStore, Protocol):
    """A store whose container the nodes may reach as the pool's managed identity
    (`storage.BlobStore`); with ``node_identity`` set, tasks get blob names, not SAS URLs."""

    @property
    def node_identity(self) -> str | None: ...

    @property
    def container_url(self) -> str: ...


def node_identity_of(store: object) -> str | None:
    """The managed identity the nodes reach ``store``'s container as, or None: SAS URLs
    (also for a store that predates node identities and does not say)."""
    return store.node_identity if isinstance(store, NodeIdentityStore) else None


@dataclass(frozen=True)
class PreparedTask:
    """A task whose payload and objects are stored; what `batch.TaskSpec` needs."""

    task_id: str
    payload_blob: str
    result_blob: str
    #: SAS URLs and the signing key, or, in node-identity mode, blob names only.
    environment: dict[str, str] = field(repr=False)
    payload_bytes: int
    #: The sha256 of each object the task reads from the job's object store.
    objects: tuple[str, ...]
    #: The sha256 of each object that travels inside the task's own payload.
    inline: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class DumpedTask:
    """A task's calls pickled, nothing stored yet: the first phase of `PayloadWriter.store`.

    It holds bytes only, never the user's objects, so the caller may drop its calls as soon
    as they are dumped. ``objects`` maps the sha256 of every large object the calls
    reference to its bytes (None when the job had already stored it: they are not kept);
    ``uses`` holds the digests each call references, so that the tasks dumped together can
    tell an object several calls share from one that a single call uses.
    """

    task_id: str
    calls: bytes = field(repr=False)
    objects: dict[str, bytes | None] = field(repr=False)
    uses: tuple[frozenset[str], ...]

    #: Bytes this dump added to the client's memory: the calls, and the objects no earlier
    #: dump of the job holds or stored (an object shared with another task counts once).
    nbytes: int = 0
    #: The keys of the task's calls in a resumable run (`memo.Memo`), in order: signed
    #: into the payload as plain data, so that the run's results can be fetched without
    #: its script (`resume.stored_results`).
    keys: tuple[str, ...] = ()


#: Mapping over a flush's tasks and objects: ``map``, or a thread pool's ``map`` to do them
#: in parallel (the submitter's prepare pool).
Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


def _fast_size(obj: Any) -> int | None:
    """The size of what pickles as one flat buffer (bytes, a numpy array not of object
    dtype), read without pickling it; None for anything else."""
    kind = type(obj)
    if kind is bytes or kind is bytearray:
        return len(obj)
    numpy = sys.modules.get("numpy")
    if numpy is None or not isinstance(obj, numpy.ndarray) or obj.dtype.hasobject:
        return None
    return int(obj.nbytes)


#: Values that are never worth storing on their own (a long ``str`` is looked at).
_SCALARS = (type(None), bool, int, float, complex)
#: The least size of an argument other than an array or bytes stored on its own, whatever
#: ``inline_threshold`` says: below it, its persistent id, object table entry and URL
#: would cost about as much as the copy, and a function or class that travels by name
#: (a module-level function, ``len``) is never this large.
_MIN_OBJECT = 1024


def _callable_parts(func: Any, depth: int = 0) -> list[Any]:
    """What of a callable may be a large argument in its own right: the instance of a bound
    method (``model.predict``), the function and arguments of a ``functools.partial``, what
    a ``functools.wraps`` wrapper wraps (scikit-learn's ``delayed``); else the callable."""
    if depth > 8:
        return [func]
    if isinstance(func, types.MethodType):
        return [func.__self__, *_callable_parts(func.__func__, depth + 1)]
    if isinstance(func, types.BuiltinMethodType) and not isinstance(
        func.__self__, types.ModuleType
    ):
        return [func.__self__]
    if isinstance(func, functools.partial):
        return [*_callable_parts(func.func, depth + 1), *func.args, *func.keywords.values()]
    try:
        wrapped = inspect.getattr_static(func, "__wrapped__", None)
    except Exception:  # pragma: no cover - getattr_static reads no user code
        wrapped = None
    if wrapped is not None and wrapped is not func and not isinstance(func, type):
        return _callable_parts(wrapped, depth + 1)
    return [func]


def _memo_keys(calls: Any) -> list[str]:
    """The call keys of a resumable task (a `Memo`, or a `Bundle` of them); [] otherwise."""
    if isinstance(calls, Memo):
        return list(calls.keys)
    if isinstance(calls, Bundle):
        return [key for part in calls.parts for key in _memo_keys(part)]
    return []


def _calls_of(calls: Any) -> list[tuple[Any, tuple[Any, ...], dict[str, Any]]] | None:
    """The ``(func, args, kwargs)`` of every call of a task (a joblib ``BatchedCalls`` or a
    `Bundle` of them), or None for any other callable: its large arguments are then found
    only where they are numpy arrays or bytes."""
    if isinstance(calls, Memo):
        return _calls_of(calls.calls)
    if isinstance(calls, Bundle):
        found: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []
        for part in calls.parts:
            items = _calls_of(part)
            if items is None:
                return None
            found.extend(items)
        return found
    items = getattr(calls, "items", None)
    if not isinstance(items, list):
        return None
    for item in items:
        if not (
            isinstance(item, tuple)
            and len(item) == 3
            and isinstance(item[1], tuple)
            and isinstance(item[2], dict)
        ):
            return None
    return items


def _builtin_warning_base(category: type[Warning]) -> type[Warning]:
    """The first builtin class in ``category``'s MRO that is a warning (``Warning`` at worst)."""
    for base in category.__mro__:
        if base.__module__ == "builtins" and issubclass(base, Warning):
            return base
    return Warning  # pragma: no cover - every Warning subclass has Warning in its MRO


_STAND_INS: dict[tuple[str, str], type[Warning]] = {}
_STAND_INS_LOCK = ForkSafeLock()


def _warning_category(module: str, qualname: str, base: type[Warning]) -> type[Warning]:
    """The warning class ``module.qualname`` on this side, or a stand-in subclass of ``base``.

    The stand-in is safe: code from a module this interpreter cannot import cannot raise
    that module's warnings here, so a filter on it only has to load, not to match. One
    stand-in per name, so that every task the process runs sees the same class.
    """
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception:
        found = None
    if isinstance(found, type) and issubclass(found, Warning):
        return found
    with _STAND_INS_LOCK:
        stand_in = _STAND_INS.get((module, qualname))
        if stand_in is None:
            stand_in = type(
                qualname.rpartition(".")[2],
                (base,),
                {
                    "__module__": module,
                    "__qualname__": qualname,
                    "__doc__": f"Stands in for {module}.{qualname}, which is not installed here.",
                },
            )
            _STAND_INS[(module, qualname)] = stand_in
    return stand_in


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with warning classes sent by name (see `_warning_category`)."""

    def reducer_override(self, obj: Any) -> Any:
        reduced = super().reducer_override(obj)
        if (
            reduced is NotImplemented  # cloudpickle sends it by reference: the node imports it
            and isinstance(obj, type)
            and issubclass(obj, Warning)
            and obj.__module__ != "builtins"
        ):
            return (
                _warning_category,
                (obj.__module__, obj.__qualname__, _builtin_warning_base(obj)),
            )
        return reduced


def _dumps(obj: Any) -> bytes:
    """The bytes of one large object: self-contained, for ``pickle.loads`` on the node."""
    if _fast_size(obj) is not None:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buffer = io.BytesIO()
    _Pickler(buffer).dump(obj)
    return buffer.getvalue()


class _Dump:
    """The large objects of one pickling of one task.

    Objects are remembered by ``id()`` for this dump only (while the calls being pickled
    keep them alive), so an object that several calls of the task share is pickled once,
    and one changed in place is pickled again by the next task.
    """

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        #: sha256 -> the bytes, for every object pickled on its own.
        self.objects: dict[str, bytes] = {}
        #: The digests the calls' pickle really references.
        self.referenced: dict[str, None] = {}
        #: Digests of arrays and bytes found below the top level (no call is known for them).
        self.nested: dict[str, None] = {}
        self._memo: dict[int, tuple[Any, str | None]] = {}

    def _known(self, obj: Any) -> tuple[bool, str | None]:
        entry = self._memo.get(id(obj))
        if entry is not None and entry[0] is obj:
            return True, entry[1]
        return False, None

    def _remember(self, obj: Any, sha: str | None) -> str | None:
        self._memo[id(obj)] = (obj, sha)
        return sha

    def _add(self, obj: Any, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.objects.setdefault(sha, data)
        self._remember(obj, sha)
        return sha

    def argument(self, obj: Any) -> str | None:
        """The digest of a top-level argument pickled on its own, or None: it is small and
        stays in the calls' pickle."""
        known, sha = self._known(obj)
        if known:
            return sha
        if isinstance(obj, _SCALARS) or (
            type(obj) is str and len(obj) < max(self.threshold, _MIN_OBJECT) // 4
        ):
            return None
        size = _fast_size(obj)
        if size is not None:
            if size < self.threshold:
                return self._remember(obj, None)
            return self._add(obj, _dumps(obj))
        data = _dumps(obj)
        if len(data) < max(self.threshold, _MIN_OBJECT):
            return self._remember(obj, None)
        return self._add(obj, data)

    def persistent_id(self, obj: Any) -> str | None:
        """The digest that replaces ``obj`` in the calls' pickle, or None."""
        known, sha = self._known(obj)
        if not known:
            size = _fast_size(obj)
            if size is None or size < self.threshold:
                return None
            sha = self._add(obj, _dumps(obj))
            self.nested[sha] = None
        if sha is not None:
            self.referenced[sha] = None
        return sha


class _ObjectPickler(_Pickler):
    """`_Pickler`, with large objects swapped for persistent ids."""

    def __init__(self, file: io.BytesIO, dump: _Dump) -> None:
        super().__init__(file)
        self._dump = dump

    def persistent_id(self, obj: Any) -> Any:
        sha = self._dump.persistent_id(obj)
        return None if sha is None else (OBJECT_TAG, sha)


class PayloadWriter:
    """Writes the tasks of one Batch job: a signed payload per task, shared objects once.

    One writer per job (``JobRun``); thread-safe, so the submitter may dump and store tasks
    on a pool of threads. Preparing is two phases, so that the tasks of one submitter flush
    are decided together: `dump` pickles a task (its calls, and each large object on its
    own), then `store` sees every object of the flush, stores once per job those that
    several calls share or that the job sent before, puts the others inside the payload of
    their one task, and uploads the payloads. `prepare` does both for one task alone.

    The writer keeps digests, never the user's objects: each dump pickles and hashes its
    objects again (what a task sends is what it names), and the bytes of an object are held
    only until its task's payload or the object itself is uploaded.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        job_id: str,
        signing_key: bytes,
        inline_threshold: int = 65536,
        sas_expiry: float | timedelta = 86400.0,
    ) -> None:
        self._store = store
        self.job_id = job_id
        self._key = signing_key
        self.inline_threshold = inline_threshold
        self._expiry = (
            sas_expiry if isinstance(sas_expiry, timedelta) else timedelta(seconds=sas_expiry)
        )
        self._lock = threading.Lock()
        #: Bytes of objects dumped and not stored yet, by sha256: tasks dumped at the same
        #: time share one copy of an object they all reference.
        self._pending: dict[str, bytes] = {}
        #: Every digest a stored task of this job referenced (inline or stored).
        self._seen: set[str] = set()
        self._stored: set[str] = set()
        self._sha_locks: dict[str, threading.Lock] = {}
        self.objects_hashed = 0
        self.objects_uploaded = 0
        self.object_bytes_uploaded = 0
        self.objects_inlined = 0
        self.inline_bytes = 0
        #: The pool's managed identity when the nodes reach the container as it (set on the
        #: store from ``BatchConfig.node_identity``); None: the nodes get SAS URLs.
        self._node_identity = node_identity_of(store)
        self._key_stored = False

    def use_key(self, key: bytes) -> None:
        """Sign with ``key`` (a resumable job's derived key) instead; before any task."""
        with self._lock:
            if self._seen or self._key_stored:
                raise RuntimeError("the signing key of a job cannot change once it stored tasks")
            self._key = key

    # -- pickling

    def _pickle(self, calls: Any) -> tuple[bytes, dict[str, bytes], tuple[frozenset[str], ...]]:
        """Cloudpickle ``calls`` with each large object on its own; returns the calls' bytes,
        the objects' bytes by sha256 and the digests each call references.

        An unpicklable function or argument raises `PayloadError` naming it, before anything
        is uploaded.
        """
        dump = _Dump(self.inline_threshold)
        buffer = io.BytesIO()
        try:
            items = _calls_of(calls)
            uses: list[frozenset[str]] = []
            for func, args, kwargs in items or ():
                shas = (dump.argument(a) for a in (*_callable_parts(func), *args, *kwargs.values()))
                uses.append(frozenset(sha for sha in shas if sha is not None))
            _ObjectPickler(buffer, dump).dump(calls)
        except Exception as e:
            raise _unpicklable(calls, e) from e
        if dump.nested:
            uses.append(frozenset(dump.nested))
        referenced = frozenset(dump.referenced)
        objects = {sha: dump.objects[sha] for sha in dump.referenced}
        with self._lock:
            self.objects_hashed += len(dump.objects)
        return (
            buffer.getvalue(),
            objects,
            tuple(use & referenced for use in uses if use & referenced),
        )

    def pickles(self, calls: Any) -> list[bytes]:
        """The bytes a task of ``calls`` would send: the calls, then each large object.

        For finding what the nodes must import (`environment.referenced_modules`): a
        DataFrame or an estimator sent as an object names its modules only in its own
        pickle. Nothing is uploaded or kept.
        """
        calls_bytes, objects, _ = self._pickle(calls)
        return [calls_bytes, *objects.values()]

    def dump(self, task_id: str, calls: Any) -> DumpedTask:
        """Pickle the task ``task_id`` of ``calls``; nothing is uploaded (`store` does it).

        Raises `PayloadError` naming the function or argument that does not pickle.
        """
        calls_bytes, objects, uses = self._pickle(calls)
        kept: dict[str, bytes | None] = {}
        nbytes = len(calls_bytes)
        with self._lock:
            for sha, data in objects.items():
                if sha not in self._stored and sha not in self._pending:
                    nbytes += len(data)
                kept[sha] = None if sha in self._stored else self._pending.setdefault(sha, data)
        return DumpedTask(
            task_id=task_id,
            calls=calls_bytes,
            objects=kept,
            uses=uses,
            nbytes=nbytes,
            keys=tuple(_memo_keys(calls)),
        )

    # -- storing

    def _store_object(self, sha: str, data: bytes) -> None:
        """Upload one object unless the job stored it: once per digest, even when several
        threads store tasks that share it (the others wait for the first)."""
        with self._lock:
            if sha in self._stored:
                return
            lock = self._sha_locks.setdefault(sha, threading.Lock())
        with lock:
            with self._lock:
                if sha in self._stored:
                    return
            uploaded = self._store.upload_if_absent(object_blob(self.job_id, sha), data)
            with self._lock:
                self._stored.add(sha)
                self._pending.pop(sha, None)
                self._sha_locks.pop(sha, None)
                if uploaded:
                    self.objects_uploaded += 1
                    self.object_bytes_uploaded += len(data)

    def _try_store_object(self, item: tuple[str, bytes]) -> Exception | None:
        try:
            self._store_object(*item)
        except Exception as e:
            return e
        return None

    def store(
        self, dumped: Sequence[DumpedTask], *, map: Mapper = map
    ) -> list[PreparedTask | Exception]:
        """Store the tasks ``dumped`` together; a `PreparedTask` or the error, per task.

        An object goes to the job's object store (once per job) when more than one call of
        these tasks references it, or when a task of this job referenced it before (it is
        then stored already, or is stored now); an object that one call alone references
        travels inside its task's payload. Objects are uploaded first, each distinct
        digest once, through ``map`` (a thread pool's, to upload them in parallel), then
        the payloads. A failed upload fails only the tasks that need it.
        """
        return self._store_dumped(dumped, map, share_all=False)

    def _store_dumped(
        self, dumped: Sequence[DumpedTask], mapper: Mapper, *, share_all: bool
    ) -> list[PreparedTask | Exception]:
        calls_of: Counter[str] = Counter(sha for d in dumped for use in d.uses for sha in use)
        with self._lock:
            referenced = {sha for d in dumped for sha in d.objects}
            shared = {
                sha
                for sha in referenced
                if share_all or calls_of[sha] > 1 or sha in self._seen or sha in self._stored
            }
            self._seen |= referenced
        new: dict[str, bytes] = {}
        for d in dumped:
            for sha, data in d.objects.items():
                if sha in shared and data is not None:  # None: stored before the dump
                    new.setdefault(sha, data)
        failed = {
            sha: error
            for sha, error in zip(
                new, mapper(self._try_store_object, list(new.items())), strict=True
            )
            if error is not None
        }
        try:
            return list(mapper(functools.partial(self._finish, shared, failed), list(dumped)))
        finally:
            # The bytes now live in the dumped tasks only, and go with them.
            with self._lock:
                for sha in referenced:
                    self._pending.pop(sha, None)

    def _finish(
        self, shared: set[str], failed: dict[str, Exception], dumped: DumpedTask
    ) -> PreparedTask | Exception:
        for sha in dumped.objects:
            if sha in failed:
                return failed[sha]
        try:
            return self._seal_task(dumped, shared)
        except Exception as e:
            return e

    def _seal_task(self, dumped: DumpedTask, shared: set[str]) -> PreparedTask:
        """Sign and upload the payload of one task whose shared objects are stored."""
        stored = tuple(sha for sha in dumped.objects if sha in shared)
        inline: dict[str, bytes] = {}
        for sha, data in dumped.objects.items():
            if sha in shared:
                continue
            if data is None:  # pragma: no cover - a digest stored before is always shared
                raise PayloadError(f"the bytes of object {sha} are no longer held")
            inline[sha] = data
        identity = self._node_identity
        if identity is not None:
            self._store_key()
            table = {sha: object_blob(self.job_id, sha) for sha in stored}
        else:
            table = {
                sha: self._store.sas_url(
                    object_blob(self.job_id, sha), read=True, expiry=self._expiry
                )
                for sha in stored
            }
        body = {
            "job_id": self.job_id,
            "task_id": dumped.task_id,
            "client": versions(),
            "objects": table,
            "inline": inline,
            "calls": dumped.calls,
            "keys": list(dumped.keys),
        }
        envelope = _seal(TASK_MAGIC, body, self._key)
        payload_name = payload_blob(self.job_id, dumped.task_id)
        result_name = result_blob(self.job_id, dumped.task_id)
        self._store.upload(payload_name, envelope, overwrite=True)
        if inline:
            with self._lock:
                self.objects_inlined += len(inline)
                self.inline_bytes += sum(map(len, inline.values()))
        if identity is not None:
            environment = {
                CONTAINER_URL_ENV: self._container_url(),
                PAYLOAD_BLOB_ENV: payload_name,
                RESULT_BLOB_ENV: result_name,
                KEY_BLOB_ENV: key_blob(self.job_id),
                NODE_IDENTITY_ENV: identity,
            }
        else:
            environment = self._signed_environment(payload_name, result_name)
        return PreparedTask(
            task_id=dumped.task_id,
            payload_blob=payload_name,
            result_blob=result_name,
            environment=environment,
            payload_bytes=len(envelope),
            objects=stored,
            inline=tuple(inline),
        )

    def _signed_environment(self, payload_name: str, result_name: str) -> dict[str, str]:
        """A task's settings with SAS URLs: read the payload, write the result, the key."""
        return {
            PAYLOAD_URL_ENV: self._store.sas_url(payload_name, read=True, expiry=self._expiry),
            RESULT_URL_ENV: self._store.sas_url(result_name, write=True, expiry=self._expiry),
            SIGNING_KEY_ENV: self._key.hex(),
        }

    def _container_url(self) -> str:
        assert isinstance(self._store, NodeIdentityStore)
        return self._store.container_url

    def prepare(self, task_id: str, calls: Any) -> PreparedTask:
        """Pickle, store the objects, store the signed payload, and sign the task's URLs.

        One task on its own: with no other task to compare with, every large object is
        stored in the job's object store (`store` decides for tasks prepared together).

        The returned `PreparedTask.environment` is the task's environment settings: a read
        SAS for the payload, a write SAS for the result, the job's signing key. The object
        table inside the payload holds a read SAS per object.

        In node-identity mode (the store's ``node_identity``) nothing is signed: the
        settings are the container's URL, the names of the payload, result and key blobs and
        the identity's resource id, the object table holds blob names, and the job's key is
        stored once, as the blob `key_blob`, for the nodes to read as that identity.
        """
        (prepared,) = self._store_dumped([self.dump(task_id, calls)], map, share_all=True)
        if isinstance(prepared, Exception):
            raise prepared
        return prepared

    def _store_key(self) -> None:
        """Store the job's key for the nodes, once per job (node-identity mode)."""
        with self._lock:
            if self._key_stored:
                return
            self._store.upload(key_blob(self.job_id), self._key, overwrite=True)
            self._key_stored = True

    def refresh(self, old_task_id: str, new_task_id: str) -> PreparedTask:
        """The stored payload of ``old_task_id`` again, for a new task ``new_task_id``, with
        fresh URLs: its calls are not pickled again (the client no longer holds them).

        For a task that could not run because its URLs expired (a long queue, a long run): the
        envelope is verified with the job's key, re-bound to the new task id, given fresh read
        URLs for its stored objects (its inline objects travel with it), sealed and stored
        under the new task's name.
        """
        store = self._store
        stored = store.download(payload_blob(self.job_id, old_task_id))
        old = _unseal(TASK_MAGIC, stored, self._key, what="task payload")
        if old.get("task_id") != old_task_id or old.get("job_id") != self.job_id:
            raise PayloadError(f"the stored payload of task {old_task_id} is not that task's")
        expiry = self._expiry
        body = dict(old)
        body["task_id"] = new_task_id
        body["objects"] = {
            sha: store.sas_url(object_blob(self.job_id, sha), read=True, expiry=expiry)
            for sha in old.get("objects", {})
        }
        envelope = _seal(TASK_MAGIC, body, self._key)
        payload_name = payload_blob(self.job_id, new_task_id)
        result_name = result_blob(self.job_id, new_task_id)
        store.upload(payload_name, envelope, overwrite=True)
        return PreparedTask(
            task_id=new_task_id,
            payload_blob=payload_name,
            result_blob=result_name,
            environment=self._signed_environment(payload_name, result_name),
            payload_bytes=len(envelope),
            objects=tuple(body["objects"]),
            inline=tuple(body.get("inline", {})),
        )


def _describe_callable(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    module = getattr(func, "__module__", None)
    if name is None:
        return repr(func)
    return f"{module}.{name}" if module else str(name)


def _unpicklable(calls: Any, error: Exception) -> PayloadError:
    """Name the call (function or argument) that does not pickle, and the fix."""
    culprit = "the batch of calls"
    if isinstance(calls, Memo):
        calls = calls.calls
    for item in getattr(calls, "items", None) or []:
        try:
            func, args, kwargs = item
        except (TypeError, ValueError):
            break
        try:
            cloudpickle.dumps(func)
        except Exception:
            culprit = f"the function {_describe_callable(func)}"
            break
        try:
            cloudpickle.dumps((args, kwargs))
        except Exception:
            culprit = f"an argument of {_describe_callable(func)}"
            break
    else:
        if callable(calls) and not hasattr(calls, "items"):
            culprit = f"the function {_describe_callable(calls)}"
    return PayloadError(
        f"Cannot send {culprit} to Azure Batch: {type(error).__name__}: {error}. "
        "Everything a task runs must pickle with cloudpickle: define the function at module "
        "level or in an importable module, and do not capture locks, open files, sockets, "
        "database connections or SDK clients in it or its arguments. Nothing was uploaded."
    )


# ---------------------------------------------------------------------- worker: reading


@dataclass(frozen=True)
class TaskEnvelope:
    """A verified task payload; ``calls`` is still cloudpickle bytes."""

    job_id: str
    task_id: str
    client: dict[str, str]
    objects: dict[str, str] = field(repr=False)  # sha256 -> read SAS URL, or blob name
    calls: bytes = field(repr=False)
    #: sha256 -> bytes of the objects that travel inside the payload (used by one call).
    inline: dict[str, bytes] = field(default_factory=dict, repr=False)


def check_task_binding(envelope: TaskEnvelope, *, job_id: str, task_id: str) -> None:
    """Raise `PayloadError` unless ``envelope`` was written for task ``task_id`` of ``job_id``.

    The worker passes the ``AZ_BATCH_JOB_ID`` and ``AZ_BATCH_TASK_ID`` that Batch sets on
    the node. A verified payload of another task means its blob was replaced (by someone
    who may write to the container) with the payload of another task of the same job:
    running it would compute that task's calls and report them as this task's.
    """
    if (envelope.job_id, envelope.task_id) == (job_id, task_id):
        return
    raise PayloadError(
        f"The task payload was written for task {envelope.task_id} of job "
        f"{envelope.job_id}, but this is task {task_id} of job {job_id}: its blob was "
        "replaced with another task's payload (someone with write access to the blob "
        "container). None of its calls were unpickled; check who may write to the storage "
        "account (docs/security.md)"
    )


def task_keys(data: bytes, key: bytes, *, job_id: str, task_id: str) -> list[str]:
    """The call keys signed into the payload of task ``task_id`` of a resumable job, read
    without unpickling anything of the user's; `PayloadError` if it does not verify or is
    another task's."""
    body = _unseal(TASK_MAGIC, data, key, what="task payload")
    if (body.get("job_id"), body.get("task_id")) != (job_id, task_id):
        raise PayloadError(f"the stored payload of task {task_id} is not that task's")
    return [str(k) for k in body.get("keys", ())]


def decode_task(data: bytes, key: bytes) -> TaskEnvelope:
    """Verify a task envelope; `PayloadError` if it does not verify. Unpickles no user code."""
    body = _unseal(TASK_MAGIC, data, key, what="task payload")
    try:
        return TaskEnvelope(
            job_id=str(body["job_id"]),
            task_id=str(body["task_id"]),
            client={str(k): str(v) for k, v in body["client"].items()},
            objects={str(k): str(v) for k, v in body["objects"].items()},
            calls=bytes(body["calls"]),
            inline={str(k): bytes(v) for k, v in body["inline"].items()},
        )
    except (KeyError, AttributeError, TypeError) as e:
        raise PayloadError(f"The task payload lacks a field: {e}") from e


class _ObjectUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, load: Callable[[str], Any]) -> None:
        super().__init__(file)
        self._load = load
        self._loaded: dict[str, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == OBJECT_TAG):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        sha = str(pid[1])
        if sha not in self._loaded:
            self._loaded[sha] = self._load(sha)
        return self._loaded[sha]


def load_calls(envelope: TaskEnvelope, load_object: Callable[[str], bytes]) -> Any:
    """Unpickle the calls; ``load_object(sha256)`` returns the bytes of a stored object.

    An object is read from the payload's ``inline`` objects first, else through
    ``load_object``; either way its sha256 is checked before it is unpickled. Call only
    after `check_versions(envelope.client)`.
    """

    def load(sha: str) -> Any:
        data = envelope.inline.get(sha)
        if data is None:
            if sha not in envelope.objects:
                raise pickle.UnpicklingError(f"object {sha} is not in the payload's object table")
            data = load_object(sha)
        if hashlib.sha256(data).hexdigest() != sha:
            raise PayloadError(f"object {sha} does not match its sha256; it was not unpickled")
        return pickle.loads(data)

    return _ObjectUnpickler(io.BytesIO(envelope.calls), load).load()


def new_attempt(node_id: str = "") -> dict[str, str]:
    """What tells one run of a task from another: node, start time and a random nonce.

    Batch sets no retry counter on the node (its ``AZ_BATCH_*`` variables name the
    account, pool, node, job and task, never the attempt; ``executionInfo.retryCount`` is
    only readable through the Batch API, which a node has no credential for). So an
    attempt is recorded as the ``AZ_BATCH_NODE_ID`` it ran on, the UTC time the worker
    started, and 16 random hex digits that keep two attempts apart even on one node
    within one second. The client does not compare it with anything: it is there to tell,
    in a kept blob or a log, which run of a retried or requeued task wrote the result.
    """
    return {
        "node_id": node_id,
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "nonce": secrets.token_hex(8),
    }


def encode_result(
    *,
    job_id: str,
    task_id: str,
    key: bytes,
    attempt: Mapping[str, str] | None = None,
    value: Any = None,
    error: BaseException | None = None,
    timings: Mapping[str, float] | None = None,
    output: Mapping[str, str] | None = None,
    warned: Sequence[Mapping[str, Any]] = (),
) -> bytes:
    """The signed result envelope: the pickled value, or the exception and its traceback.

    ``job_id`` and ``task_id`` are those of the task that ran (the client refuses the
    result for any other task); ``attempt`` is `new_attempt` (a fresh one when omitted).
    A value that does not pickle becomes a `PayloadError` result, and an exception that
    does not survive a pickle round trip here (a keyword-only ``__init__``, a lock in its
    attributes) travels as type, message and traceback only, for `RemoteError`.
    """
    value_bytes: bytes | None = None
    if error is None:
        try:
            value_bytes = cloudpickle.dumps(value)
        except Exception as e:
            error = PayloadError(
                f"The return value of task {task_id} cannot be pickled: {type(e).__name__}: "
                f"{e}. Return plain data (numbers, arrays, frames, fitted estimators)."
            )
            error.__cause__ = e
    exception_bytes: bytes | None = None
    exc_type = exc_message = tb_text = ""
    if error is not None:
        exc_type = f"{type(error).__module__}.{type(error).__qualname__}"
        exc_message = _safe_str(error)
        tb_text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        try:
            exception_bytes = cloudpickle.dumps(error)
            pickle.loads(exception_bytes)
        except Exception:
            exception_bytes = None
    body = {
        "job_id": job_id,
        "task_id": task_id,
        "attempt": {str(k): str(v) for k, v in (attempt or new_attempt()).items()},
        "ok": error is None,
        "value": value_bytes,
        "exception": exception_bytes,
        "exc_type": exc_type,
        "exc_message": exc_message,
        "traceback": tb_text,
        "worker": versions(),
        "timings": {str(k): float(v) for k, v in (timings or {}).items()},
        "output": {str(k): str(v) for k, v in (output or {}).items()},
        "warnings": [dict(w) for w in warned],
    }
    return _seal(RESULT_MAGIC, body, key)


def _safe_str(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:
        return f"<{type(error).__name__}: str() failed>"


# ---------------------------------------------------------------------- client: results


_FRAME = re.compile(r'^(\s*)File "([^"]+)", line (\d+), in .*$')


#: The file name cloudpickle (>= 3.1) gives the code of every function it sends by value.
_BY_VALUE_FILENAME = "<dynamic-code>"


def _by_value_source(name: str, lineno: int) -> str:
    """The source line ``lineno`` of the function ``name`` this process sent by value:
    looked up among ``__main__`` and the modules registered to travel by value (their
    functions and the methods of their classes), whose files are on this machine."""
    roots = {"__main__", *cloudpickle.list_registry_pickle_by_value()}
    modules = [
        m
        for key, m in list(sys.modules.items())
        if m is not None and any(key == r or key.startswith(r + ".") for r in roots)
    ]
    for module in modules:
        for value in list(vars(module).values()):
            members = list(vars(value).values()) if isinstance(value, type) else [value]
            for member in members:
                code = (
                    getattr(inspect.unwrap(member), "__code__", None) if callable(member) else None
                )
                if code is None or code.co_name != name:
                    continue
                try:
                    lines, first = inspect.getsourcelines(member)
                    filename = inspect.getsourcefile(member)
                except (OSError, TypeError):
                    continue
                if filename and first <= lineno < first + len(lines):
                    return linecache.getline(filename, lineno).strip()
    return ""


def with_source_lines(tb: str) -> str:
    """A remote traceback with the source line under each frame that lacks one.

    A function sent by value runs on the node without its source file, so Python prints
    its frames without code. The client usually has that source (the script, a notebook
    cell that IPython keeps in ``linecache``): add the line from there.
    """
    lines = tb.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        match = _FRAME.match(line)
        if match is None:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if following.startswith(match.group(1) + "    ") and not _FRAME.match(following):
            continue  # the node had the source
        lineno = int(match.group(3))
        if match.group(2) == _BY_VALUE_FILENAME:
            code = _by_value_source(line.rsplit(" in ", 1)[-1].strip(), lineno)
        else:
            code = linecache.getline(match.group(2), lineno).strip()
        if code:
            out.append(f"{match.group(1)}    {code}")
    return "\n".join(out) + ("\n" if tb.endswith("\n") else "")


def warning_record(w: warnings.WarningMessage) -> dict[str, Any]:
    """A warning the calls raised, as plain data for the result envelope."""
    category = w.category
    return {
        "module": category.__module__,
        "qualname": category.__qualname__,
        "base": _builtin_warning_base(category).__name__,
        "message": str(w.message),
        "filename": str(w.filename),
        "lineno": int(w.lineno or 0),
    }


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a node, attached as ``__cause__``."""

    def __init__(self, tb: str = "", /) -> None:
        super().__init__(tb)
        try:
            self.tb = with_source_lines(tb)
        except Exception:  # decorating must never replace the user's exception
            self.tb = tb

    def __str__(self) -> str:
        return f"\n\nTraceback on the Azure Batch node:\n{self.tb}"


@dataclass(frozen=True)
class ResultEnvelope:
    """A verified result; `result` gives the values or raises the task's exception.

    ``job_id`` and ``task_id`` name the task that wrote it (`read_result` has checked that
    they are the ones expected); ``attempt`` is that run's `new_attempt`.
    """

    job_id: str
    task_id: str
    attempt: dict[str, str]
    ok: bool
    value: bytes | None = field(repr=False)
    exception_bytes: bytes | None = field(repr=False)
    exc_type: str
    exc_message: str
    traceback: str = field(repr=False)
    worker: dict[str, str]
    timings: dict[str, float]
    #: What the calls printed (``stdout``, ``stderr``; the end of it when it was long).
    output: dict[str, str] = field(default_factory=dict, repr=False)
    #: The warnings the calls raised, as `warning_record` made them.
    warned: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    def reemit_warnings(self) -> None:
        """Raise the calls' warnings again here, each as its own category at its remote
        file and line, so that ``warnings`` filters and ``pytest.warns`` see them as they
        would with ``n_jobs=1``."""
        import builtins

        for w in self.warned:
            base = getattr(builtins, str(w.get("base", "Warning")), Warning)
            if not (isinstance(base, type) and issubclass(base, Warning)):
                base = Warning
            module = str(w.get("module"))
            # A class of a module this process has not imported falls back to its base:
            # a warning must not import code the worker named.
            if module not in sys.modules:
                category: type[Warning] = base
            else:
                category = _warning_category(module, str(w.get("qualname")), base)
            warnings.warn_explicit(
                str(w.get("message", "")),
                category,
                str(w.get("filename", "<remote>")),
                int(w.get("lineno", 0) or 0),
            )

    def exception(self) -> BaseException | None:
        """The task's exception with its remote traceback as ``__cause__``, or None.

        The original type when it unpickles here, else `RemoteError` carrying type,
        message and traceback.
        """
        if self.ok:
            return None
        error: BaseException | None = None
        if self.exception_bytes is not None:
            try:
                loaded = pickle.loads(self.exception_bytes)
            except Exception:
                loaded = None
            if isinstance(loaded, BaseException):
                error = loaded
        if error is None:
            return RemoteError(self.exc_type, self.exc_message, self.traceback)
        error.__cause__ = RemoteTraceback(self.traceback)
        return error

    def result(self) -> Any:
        """The task's return value (for a `BatchedCalls`, the list of call results)."""
        error = self.exception()
        if error is not None:
            raise error
        try:
            return pickle.loads(self.value or b"")
        except Exception as e:
            raise PayloadError(
                f"The result of task {self.task_id} cannot be unpickled here: "
                f"{type(e).__name__}: {e}. The client lacks a module or class that the "
                "worker returned; install it on the client."
            ) from e


def read_result(data: bytes, key: bytes, *, job_id: str, task_id: str) -> ResultEnvelope:
    """Verify the result of task ``task_id`` of ``job_id`` without unpickling user data.

    `PayloadError` if it fails the MAC, has another envelope version, or was written by
    another task or job: a result blob swapped with another task's verifies (same job,
    same key), and only the binding keeps the client from handing back its values.
    """
    body = _unseal(RESULT_MAGIC, data, key, what="task result")
    try:
        envelope = ResultEnvelope(
            job_id=str(body["job_id"]),
            task_id=str(body["task_id"]),
            attempt={str(k): str(v) for k, v in body["attempt"].items()},
            ok=bool(body["ok"]),
            value=body["value"],
            exception_bytes=body["exception"],
            exc_type=str(body["exc_type"]),
            exc_message=str(body["exc_message"]),
            traceback=str(body["traceback"]),
            worker={str(k): str(v) for k, v in body["worker"].items()},
            timings={str(k): float(v) for k, v in body["timings"].items()},
            output={str(k): str(v) for k, v in body.get("output", {}).items()},
            warned=tuple(dict(w) for w in body.get("warnings", ())),
        )
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise PayloadError(f"The task result lacks a field: {e}") from e
    if (envelope.job_id, envelope.task_id) != (job_id, task_id):
        raise PayloadError(
            f"The result read for task {task_id} of job {job_id} was written by task "
            f"{envelope.task_id} of job {envelope.job_id}: its blob was replaced with "
            "another task's result (someone with write access to the blob container). "
            "It was not used; check who may write to the storage account "
            "(docs/security.md)"
        )
    return envelope

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

Large arguments (numpy arrays, bytes, and through their arrays pandas objects) are not
copied into every task: a cloudpickle `Pickler` replaces each one at or above
``inline_threshold`` bytes by the persistent id ``("joblib-azurebatch-object", sha256)``,
stores it once per job under ``jobs/{job_id}/objects/{sha256}``, and hands the task a
read-only SAS URL for it (in node-identity mode, its blob name). The sha256 travels inside
the signed payload, so the worker verifies every object it downloads (or finds in its node
cache) before unpickling it.

Warning classes that cloudpickle would send by reference travel as ``(module, qualname,
builtin base)`` instead: scikit-learn ships the caller's ``warnings.filters`` with every call,
and a filter on a class from a module the image lacks (pytest's, a notebook extension's)
would otherwise stop every task with ``ModuleNotFoundError`` before the user's code.
"""

from __future__ import annotations

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
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, runtime_checkable

import cloudpickle
import joblib

from joblib_azurebatch.errors import PayloadError, RemoteError, VersionMismatchError

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
    "versions",
    "warning_record",
    "with_source_lines",
]

TASK_MAGIC = b"JABT"
RESULT_MAGIC = b"JABR"
#: 2: a result envelope names its job and attempt, and both envelopes are checked
#: against the task they are read for (1 had neither check).
ENVELOPE_VERSION = 2
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
    objects: tuple[str, ...]


def _large_size(obj: Any, threshold: int) -> int | None:
    """The serialized size if ``obj`` goes to the object store, else None (fast path)."""
    kind = type(obj)
    if kind is bytes or kind is bytearray:
        size = len(obj)
    else:
        numpy = sys.modules.get("numpy")
        if numpy is None or not isinstance(obj, numpy.ndarray) or obj.dtype.hasobject:
            return None
        size = int(obj.nbytes)
    return size if size >= threshold else None


def _builtin_warning_base(category: type[Warning]) -> type[Warning]:
    """The first builtin class in ``category``'s MRO that is a warning (``Warning`` at worst)."""
    for base in category.__mro__:
        if base.__module__ == "builtins" and issubclass(base, Warning):
            return base
    return Warning  # pragma: no cover - every Warning subclass has Warning in its MRO


_STAND_INS: dict[tuple[str, str], type[Warning]] = {}
_STAND_INS_LOCK = threading.Lock()


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


class _ObjectPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with large arguments swapped for persistent ids and warning classes
    sent by name (see `_warning_category`)."""

    def __init__(self, file: io.BytesIO, writer: PayloadWriter) -> None:
        super().__init__(file)
        self._writer = writer
        self.referenced: dict[str, None] = {}

    def persistent_id(self, obj: Any) -> Any:
        if _large_size(obj, self._writer.inline_threshold) is None:
            return None
        sha = self._writer._digest(obj)
        self.referenced[sha] = None
        return (OBJECT_TAG, sha)

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


class PayloadWriter:
    """Writes the tasks of one Batch job: objects once, a signed payload per task.

    One writer per job (``JobRun``); thread-safe, so a submitter thread may prepare tasks
    while the caller's thread dispatches more. Each distinct large object is serialized
    and hashed once (cached by ``id()`` with a strong reference, so an id is not reused by
    another object while the job runs) and uploaded once.
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
        self._by_id: dict[int, tuple[Any, str]] = {}
        self._unsent: dict[str, bytes] = {}
        self._stored: set[str] = set()
        self._sha_locks: dict[str, threading.Lock] = {}
        self.objects_hashed = 0
        self.objects_uploaded = 0
        self.object_bytes_uploaded = 0
        #: The pool's managed identity when the nodes reach the container as it (set on the
        #: store from ``BatchConfig.node_identity``); None: the nodes get SAS URLs.
        self._node_identity = node_identity_of(store)
        self._key_stored = False

    # -- pickling

    def _digest(self, obj: Any) -> str:
        with self._lock:
            cached = self._by_id.get(id(obj))
            if cached is not None and cached[0] is obj:
                return cached[1]
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            self._by_id[id(obj)] = (obj, sha)
            self.objects_hashed += 1
            if sha not in self._stored:
                self._unsent.setdefault(sha, data)
        return sha

    def _dump(self, calls: Any) -> tuple[bytes, list[str]]:
        """Cloudpickle ``calls``; returns the bytes and the sha256 of each object referenced.

        An unpicklable function or argument raises `PayloadError` naming it, before anything
        is uploaded.
        """
        buffer = io.BytesIO()
        pickler = _ObjectPickler(buffer, self)
        try:
            pickler.dump(calls)
        except Exception as e:
            raise _unpicklable(calls, e) from e
        return buffer.getvalue(), list(pickler.referenced)

    def pickles(self, calls: Any) -> list[bytes]:
        """The bytes a task of ``calls`` would send: the calls, then each large object.

        For finding what the nodes must import (`environment.referenced_modules`): a
        DataFrame sent as an object names pandas only in its own pickle. Nothing is uploaded;
        the objects stay queued for the task that sends them.
        """
        calls_bytes, shas = self._dump(calls)
        with self._lock:
            objects = [self._unsent[sha] for sha in shas if sha in self._unsent]
        return [calls_bytes, *objects]

    # -- storing

    def _store_object(self, sha: str) -> None:
        with self._lock:
            if sha in self._stored:
                return
            lock = self._sha_locks.setdefault(sha, threading.Lock())
        with lock:
            with self._lock:
                if sha in self._stored:
                    return
                data = self._unsent[sha]
            uploaded = self._store.upload_if_absent(object_blob(self.job_id, sha), data)
            with self._lock:
                self._stored.add(sha)
                del self._unsent[sha]
                if uploaded:
                    self.objects_uploaded += 1
                    self.object_bytes_uploaded += len(data)

    def prepare(self, task_id: str, calls: Any) -> PreparedTask:
        """Pickle, store new objects, store the signed payload, and sign the task's URLs.

        The returned `PreparedTask.environment` is the task's environment settings: a read
        SAS for the payload, a write SAS for the result, the job's signing key. The object
        table inside the payload holds a read SAS per object.

        In node-identity mode (the store's ``node_identity``) nothing is signed: the
        settings are the container's URL, the names of the payload, result and key blobs and
        the identity's resource id, the object table holds blob names, and the job's key is
        stored once, as the blob `key_blob`, for the nodes to read as that identity.
        """
        if self._node_identity is not None:
            return self._prepare_for_identity(task_id, calls, self._node_identity)
        calls_bytes, shas = self._dump(calls)
        for sha in shas:
            self._store_object(sha)
        objects = {
            sha: self._store.sas_url(object_blob(self.job_id, sha), read=True, expiry=self._expiry)
            for sha in shas
        }
        body = {
            "job_id": self.job_id,
            "task_id": task_id,
            "client": versions(),
            "objects": objects,
            "calls": calls_bytes,
        }
        envelope = _seal(TASK_MAGIC, body, self._key)
        payload_name = payload_blob(self.job_id, task_id)
        result_name = result_blob(self.job_id, task_id)
        self._store.upload(payload_name, envelope, overwrite=True)
        environment = {
            PAYLOAD_URL_ENV: self._store.sas_url(payload_name, read=True, expiry=self._expiry),
            RESULT_URL_ENV: self._store.sas_url(result_name, write=True, expiry=self._expiry),
            SIGNING_KEY_ENV: self._key.hex(),
        }
        return PreparedTask(
            task_id=task_id,
            payload_blob=payload_name,
            result_blob=result_name,
            environment=environment,
            payload_bytes=len(envelope),
            objects=tuple(shas),
        )

    def _store_key(self) -> None:
        """Store the job's key for the nodes, once per job (node-identity mode)."""
        with self._lock:
            if self._key_stored:
                return
            self._store.upload(key_blob(self.job_id), self._key, overwrite=True)
            self._key_stored = True

    def _prepare_for_identity(self, task_id: str, calls: Any, identity: str) -> PreparedTask:
        """`prepare` in node-identity mode: blob names in the task, the key in a blob."""
        assert isinstance(self._store, NodeIdentityStore)
        calls_bytes, shas = self._dump(calls)
        self._store_key()
        for sha in shas:
            self._store_object(sha)
        body = {
            "job_id": self.job_id,
            "task_id": task_id,
            "client": versions(),
            "objects": {sha: object_blob(self.job_id, sha) for sha in shas},
            "calls": calls_bytes,
        }
        envelope = _seal(TASK_MAGIC, body, self._key)
        payload_name = payload_blob(self.job_id, task_id)
        result_name = result_blob(self.job_id, task_id)
        self._store.upload(payload_name, envelope, overwrite=True)
        environment = {
            CONTAINER_URL_ENV: self._store.container_url,
            PAYLOAD_BLOB_ENV: payload_name,
            RESULT_BLOB_ENV: result_name,
            KEY_BLOB_ENV: key_blob(self.job_id),
            NODE_IDENTITY_ENV: identity,
        }
        return PreparedTask(
            task_id=task_id,
            payload_blob=payload_name,
            result_blob=result_name,
            environment=environment,
            payload_bytes=len(envelope),
            objects=tuple(shas),
        )

    def refresh(self, old_task_id: str, new_task_id: str) -> PreparedTask:
        """The stored payload of ``old_task_id`` again, for a new task ``new_task_id``, with
        fresh URLs: its calls are not pickled again (the client may no longer hold them).

        For a task that could not run because its URLs expired (a long queue, a long run): the
        envelope is verified with the job's key, re-bound to the new task id, given fresh read
        URLs for its objects, sealed and stored under the new task's name.
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
            environment={
                PAYLOAD_URL_ENV: store.sas_url(payload_name, read=True, expiry=expiry),
                RESULT_URL_ENV: store.sas_url(result_name, write=True, expiry=expiry),
                SIGNING_KEY_ENV: self._key.hex(),
            },
            payload_bytes=len(envelope),
            objects=tuple(body["objects"]),
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
    """Unpickle the calls; ``load_object(sha256)`` returns the verified bytes of an object.

    Call only after `check_versions(envelope.client)`.
    """

    def load(sha: str) -> Any:
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

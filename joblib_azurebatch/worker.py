"""The program every Batch task runs: ``python -m joblib_azurebatch.worker``.

It needs only what the worker image installs and no account credential: the task's
environment gives it a read SAS URL for its payload, a write SAS URL for its result and the
job's signing key. In node-identity mode (``BatchConfig.node_identity``) it gives names
instead: the container's URL, the blobs of the payload, the result and the job's key, and
the resource id of the pool's managed identity, as which the worker reads and writes them
(`storage.NodeContainer`). It downloads and verifies the payload, checks that this
interpreter can load the client's pickles, fetches the large arguments through a cache
shared by the tasks of the node, runs the calls and uploads a signed result envelope.

The exit code tells Batch whether to retry: 0 whenever a result was uploaded, including
when the user's function raised (the client re-raises it) or the versions differ (a retry
would not help); non-zero only when the infrastructure failed, and then stderr says why.

Two of those failures are refusals, not accidents. A payload that verifies but names
another task or job than the ``AZ_BATCH_TASK_ID`` and ``AZ_BATCH_JOB_ID`` Batch sets on the
node is another task's payload put in this task's blob; nothing of it runs
(`EXIT_WRONG_TASK`). And SAS URLs have an expiry (``se=``): a task that starts, or
finishes, after it (a long queue, a long run) exits with `EXIT_URLS_EXPIRED` and a line
saying when they expired, so that the client can prepare the task again with fresh URLs
instead of reading it as a broken node.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import os
import re
import secrets
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import parse_qs, urlsplit

from joblib_azurebatch.environment import check_pins, current_environment
from joblib_azurebatch.errors import AzureBatchError, CredentialError, PayloadError
from joblib_azurebatch.memo import TaskContext, task_context
from joblib_azurebatch.payload import (
    CONTAINER_URL_ENV,
    KEY_BLOB_ENV,
    NODE_IDENTITY_ENV,
    PAYLOAD_BLOB_ENV,
    PAYLOAD_URL_ENV,
    RESULT_BLOB_ENV,
    RESULT_URL_ENV,
    SIGNING_KEY_ENV,
    TaskEnvelope,
    check_task_binding,
    check_versions,
    decode_task,
    encode_result,
    load_calls,
    new_attempt,
    warning_record,
)

# SAS URLs are read and written with the standard library (sasurl.py): a task that has
# them, the default, never imports the Azure SDKs. Only node-identity mode needs the blob
# SDK and azure-identity, and imports storage.py where it reads that mode's environment.
from joblib_azurebatch.sasurl import download_url, redact_url, upload_url

if TYPE_CHECKING:
    from joblib_azurebatch.storage import NodeContainer

__all__ = [
    "EXIT_BAD_ENVIRONMENT",
    "EXIT_DOWNLOAD_FAILED",
    "EXIT_OBJECT_FAILED",
    "EXIT_OK",
    "EXIT_UNVERIFIED",
    "EXIT_UPLOAD_FAILED",
    "EXIT_URLS_EXPIRED",
    "EXIT_WRONG_TASK",
    "JOB_ID_ENV",
    "NODE_ID_ENV",
    "TASK_ID_ENV",
    "ObjectCache",
    "main",
    "url_expiry",
]

EXIT_OK = 0
EXIT_BAD_ENVIRONMENT = 2
EXIT_DOWNLOAD_FAILED = 3
EXIT_UNVERIFIED = 4
EXIT_OBJECT_FAILED = 5
EXIT_UPLOAD_FAILED = 6
#: The payload verifies but was written for another task or job (its blob was replaced).
EXIT_WRONG_TASK = 7
#: A SAS URL of the task expired before the worker could use it: not a broken node, the
#: task needs fresh URLs. 75 is ``EX_TEMPFAIL`` of sysexits.h, "try again later".
EXIT_URLS_EXPIRED = 75

#: Set by Batch on every task (not on a start task); the payload must name the same ids.
JOB_ID_ENV = "AZ_BATCH_JOB_ID"
TASK_ID_ENV = "AZ_BATCH_TASK_ID"
#: Set by Batch on every task; recorded in the result's attempt.
NODE_ID_ENV = "AZ_BATCH_NODE_ID"

_PREFIX = "[joblib-azurebatch worker]"
# Cached objects unused for a week go; so do temporary files of downloads that died.
_CACHE_MAX_AGE = 7 * 86400.0
_TEMPORARY_MAX_AGE = 3600.0


class _InfrastructureError(Exception):
    """A failure outside the user's code: the worker exits with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _UrlsExpired(_InfrastructureError):
    """A SAS URL of the task is past its ``se=`` (or its delegation key's ``ske=``)."""

    def __init__(self, expiry: datetime) -> None:
        super().__init__(
            EXIT_URLS_EXPIRED,
            f"the task's URLs expired at {expiry:%Y-%m-%dT%H:%M:%SZ}; it must be prepared "
            "again with fresh URLs (BatchConfig(sas_expiry=...) sets how long they last: "
            "longer than a task may wait in the queue plus its run)",
        )
        self.expiry = expiry


# ``YYYY-MM-DD``, optionally ``Thh:mm``, ``:ss`` and a fraction, in UTC ("Z"): the forms
# a SAS ``se``/``ske`` takes.
_SAS_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?Z?")


def url_expiry(url: str) -> datetime | None:
    """When a SAS URL stops working (UTC), or None if it has no readable expiry.

    That is its ``se=``, or its user delegation key's ``ske=`` when that comes first (a
    user delegation SAS is refused once its key expired).
    """
    query = parse_qs(urlsplit(url).query)
    found: list[datetime] = []
    for name in ("se", "ske"):
        for text in query.get(name, []):
            match = _SAS_TIME.fullmatch(text.strip())
            if match is None:
                continue
            year, month, day, hour, minute, second = (int(p or 0) for p in match.groups())
            try:
                found.append(datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc))
            except ValueError:
                continue
    return min(found) if found else None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _ensure_fresh(*urls: str) -> None:
    """Raise `_UrlsExpired` before a request that the service would refuse anyway."""
    now = _now()
    expired = [e for e in map(url_expiry, urls) if e is not None and e <= now]
    if expired:
        raise _UrlsExpired(min(expired))


def _expired_refusal(error: CredentialError, url: str) -> _UrlsExpired | None:
    """The refusal as an expiry. Azure Storage answers an expired SAS with 403
    ``AuthenticationFailed`` (Azurite with 403 ``AuthorizationFailure``), answers that also
    mean a wrong permission or signature: the URL's own expiry, now past, tells them apart."""
    expiry = url_expiry(url)
    if error.status_code == 403 and expiry is not None and expiry <= _now():
        return _UrlsExpired(expiry)
    return None


def _download(url: str) -> bytes:
    _ensure_fresh(url)
    try:
        return download_url(url)
    except CredentialError as e:
        expired = _expired_refusal(e, url)
        if expired is not None:
            raise expired from e
        raise


def _upload(url: str, data: bytes) -> None:
    _ensure_fresh(url)
    try:
        upload_url(url, data)
    except CredentialError as e:
        expired = _expired_refusal(e, url)
        if expired is not None:
            raise expired from e
        raise


class ObjectCache:
    """The node's copy of the job's large arguments, shared by concurrent tasks.

    Files are named by sha256 and written to a temporary name then renamed with
    `os.replace`, so a reader never sees half a file; an exclusive lock per object makes a
    second task wait for the first one's download instead of downloading again. A file
    whose content does not match its name is replaced, never used.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.hits = 0
        self.downloads = 0
        self._lock = threading.Lock()

    @classmethod
    def for_node(cls, environ: Mapping[str, str]) -> ObjectCache:
        """The cache in ``$AZ_BATCH_NODE_SHARED_DIR``, or a temporary folder if unusable."""
        candidates = []
        shared = environ.get("AZ_BATCH_NODE_SHARED_DIR")
        if shared:
            candidates.append(Path(shared) / "joblib-azurebatch" / "objects")
        candidates.append(Path(tempfile.gettempdir()) / f"joblib-azurebatch-{os.getuid()}")
        for directory in candidates:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if os.access(directory, os.W_OK | os.X_OK):
                return cls(directory)
        return cls(Path(tempfile.mkdtemp(prefix="joblib-azurebatch-")))

    @contextlib.contextmanager
    def _locked(self, sha: str) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Batch nodes here are Linux
            yield
            return
        with open(self.directory / f".{sha}.lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def prune(self, *, max_age: float = _CACHE_MAX_AGE) -> int:
        """Delete objects no task used for ``max_age`` seconds; returns how many.

        A long-lived pool serves many jobs, and without this their objects would fill the
        node's disk. Best effort: a file that another task removes first is skipped.
        """
        removed = 0
        now = time.time()
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return 0
        for entry in entries:
            try:
                if not entry.is_file() or entry.name.endswith(".lock"):
                    continue
                limit = _TEMPORARY_MAX_AGE if entry.name.startswith(".") else max_age
                if now - entry.stat().st_mtime > limit:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed

    def _read_verified(self, path: Path, sha: str) -> bytes | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() == sha:
            with contextlib.suppress(OSError):
                os.utime(path)  # last use, for prune()
            return data
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None

    def get(self, sha: str, url: str, fetch: Callable[[str], bytes] | None = None) -> bytes:
        """The object's bytes, from the cache or downloaded once for the whole node.

        ``url`` is where the payload's object table says the object is: a SAS URL, read
        with ``download_url``, or, given ``fetch``, what ``fetch`` reads (a blob name).
        """
        path = self.directory / sha
        data = self._read_verified(path, sha)
        if data is None:
            with self._locked(sha):
                data = self._read_verified(path, sha)
                if data is None:
                    data = (fetch or _download)(url)
                    if hashlib.sha256(data).hexdigest() != sha:
                        raise PayloadError(
                            f"object {sha} downloaded from {redact_url(url)} does not match "
                            "its sha256"
                        )
                    temporary = self.directory / f".{sha}.{os.getpid()}.{secrets.token_hex(4)}"
                    temporary.write_bytes(data)
                    os.replace(temporary, path)
                    with self._lock:
                        self.downloads += 1
                    return data
        with self._lock:
            self.hits += 1
        return data


def _log(out: TextIO, message: str) -> None:
    print(f"{_PREFIX} {message}", file=out, flush=True)


class _SasBlobs:
    """A task's blobs through the SAS URLs in its environment, and the key given there."""

    def __init__(self, payload_url: str, result_url: str, key: bytes) -> None:
        self.payload_url = payload_url
        self.result_url = result_url
        self._key = key

    def key(self) -> bytes:
        return self._key

    def check_fresh(self) -> None:
        # Nothing is worth downloading or running if the result could not be uploaded.
        _ensure_fresh(self.payload_url, self.result_url)

    @property
    def payload_location(self) -> str:
        return redact_url(self.payload_url)

    def read_payload(self) -> bytes:
        return _download(self.payload_url)

    def read_object(self, url: str) -> bytes:
        return _download(url)

    def write_result(self, data: bytes) -> None:
        _upload(self.result_url, data)

    def read_ref(self, url: str) -> bytes | None:
        """A call's record (`memo.Memo`), or None if it was never stored."""
        try:
            return _download(url)
        except FileNotFoundError:
            return None

    def write_ref(self, url: str, data: bytes) -> None:
        _upload(url, data)

    def close(self) -> None:
        return None


class _IdentityBlobs:
    """A task's blobs by name, read and written as the pool's managed identity; the job's
    key is a blob too. Nothing in the task's definition grants access to any of them."""

    def __init__(
        self, container: NodeContainer, *, payload: str, result: str, key: str, where: str
    ) -> None:
        self._container = container
        self._payload = payload
        self._result = result
        self._key_blob = key
        self._where = where

    def key(self) -> bytes:
        try:
            return self._container.download(self._key_blob)
        except (AzureBatchError, OSError) as e:
            raise _InfrastructureError(
                EXIT_DOWNLOAD_FAILED, f"downloading the job's key failed: {e}"
            ) from e

    def check_fresh(self) -> None:
        return None  # a token, unlike a SAS URL, is fetched afresh when it expires

    @property
    def payload_location(self) -> str:
        return f"{self._where}/{self._payload}"

    def read_payload(self) -> bytes:
        return self._container.download(self._payload)

    def read_object(self, name: str) -> bytes:
        return self._container.download(name)

    def write_result(self, data: bytes) -> None:
        self._container.upload(self._result, data)

    def read_ref(self, name: str) -> bytes | None:
        """A call's record (`memo.Memo`), or None if it was never stored."""
        try:
            return self._container.download(name)
        except FileNotFoundError:
            return None

    def write_ref(self, name: str, data: bytes) -> None:
        self._container.upload(name, data)

    def close(self) -> None:
        self._container.close()


_TaskBlobs = _SasBlobs | _IdentityBlobs


def _missing(environ: Mapping[str, str], names: tuple[str, ...]) -> None:
    missing = [name for name in names if not environ.get(name)]
    if missing:
        raise _InfrastructureError(
            EXIT_BAD_ENVIRONMENT,
            f"the task's environment lacks {', '.join(missing)}; this program runs inside "
            "Batch tasks created by the joblib 'azurebatch' backend",
        )


def _read_environment(environ: Mapping[str, str]) -> _TaskBlobs:
    """How this task reaches its blobs, from its environment; refuses to run without the
    ids Batch sets on every task, since without them a payload swapped in from another task
    could not be told apart."""
    if environ.get(NODE_IDENTITY_ENV):
        names = (CONTAINER_URL_ENV, PAYLOAD_BLOB_ENV, RESULT_BLOB_ENV, KEY_BLOB_ENV)
        _missing(environ, (*names, JOB_ID_ENV, TASK_ID_ENV))
        container_url = environ[CONTAINER_URL_ENV]
        try:
            from joblib_azurebatch.storage import NodeContainer

            container = NodeContainer(container_url, identity=environ[NODE_IDENTITY_ENV])
        except ValueError as e:
            raise _InfrastructureError(EXIT_BAD_ENVIRONMENT, f"{CONTAINER_URL_ENV}: {e}") from e
        except ImportError as e:
            raise _InfrastructureError(
                EXIT_BAD_ENVIRONMENT,
                f"the task names a managed identity but the node cannot use one ({e}): "
                "install azure-identity and azure-storage-blob in the worker image "
                "(docker/requirements.txt has them)",
            ) from e
        return _IdentityBlobs(
            container,
            payload=environ[PAYLOAD_BLOB_ENV],
            result=environ[RESULT_BLOB_ENV],
            key=environ[KEY_BLOB_ENV],
            where=redact_url(container_url),
        )
    _missing(environ, (PAYLOAD_URL_ENV, RESULT_URL_ENV, SIGNING_KEY_ENV, JOB_ID_ENV, TASK_ID_ENV))
    try:
        key = bytes.fromhex(environ[SIGNING_KEY_ENV])
    except ValueError:
        raise _InfrastructureError(
            EXIT_BAD_ENVIRONMENT, f"{SIGNING_KEY_ENV} is not a hexadecimal key"
        ) from None
    return _SasBlobs(environ[PAYLOAD_URL_ENV], environ[RESULT_URL_ENV], key)


def _fetch_objects(
    envelope: TaskEnvelope, cache: ObjectCache, fetch: Callable[[str], bytes] | None = None
) -> dict[str, bytes]:
    if not envelope.objects:
        return {}
    with ThreadPoolExecutor(max_workers=min(4, len(envelope.objects))) as pool:
        futures = {
            sha: pool.submit(cache.get, sha, url, fetch) for sha, url in envelope.objects.items()
        }
        try:
            return {sha: future.result() for sha, future in futures.items()}
        except (AzureBatchError, OSError) as e:
            raise _InfrastructureError(
                EXIT_OBJECT_FAILED, f"fetching a shared object failed: {e}"
            ) from e


def _add_note(error: BaseException, note: str) -> None:
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(note)


def _hint_relative_path(error: BaseException) -> None:
    """A relative path that works on the client is looked up in the task's own working
    folder on the node: say so, since the traceback alone suggests a missing file."""
    name = getattr(error, "filename", None)
    if isinstance(error, OSError) and isinstance(name, (str, bytes)) and name:
        path = os.fsdecode(name)
        if not os.path.isabs(path):
            _add_note(
                error,
                f"{path!r} is a relative path: on a Batch node it is looked up in the task's "
                f"working folder ({os.getcwd()}), not in the folder your script ran in. Pass "
                "the data itself as an argument (large arrays and frames are uploaded once per "
                "job), or read it from a blob or URL inside the function.",
            )


class _Tail(io.TextIOBase):
    """Writes through to the task's own stream (stdout.txt, stderr.txt stay complete) and
    keeps the last ``OUTPUT_TAIL_CHARS`` characters for the result envelope."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._parts: collections.deque[str] = collections.deque()
        self._size = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._stream.write(text)
        self._parts.append(text)
        self._size += len(text)
        while self._size > OUTPUT_TAIL_CHARS and len(self._parts) > 1:
            gone = self._parts.popleft()
            self._size -= len(gone)
            self.dropped += len(gone)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    # What user code may ask of sys.stdout (subprocess, faulthandler, .buffer, .encoding)
    # is the real stream's: only text written through write() is also kept.
    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._stream, "errors", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def text(self) -> str:
        text = "".join(self._parts)[-OUTPUT_TAIL_CHARS:]
        if self.dropped or self._size > OUTPUT_TAIL_CHARS:
            text = f"[... the start is in the task's file on the node ...]\n{text}"
        return text


@dataclass
class _Captured:
    """What the calls printed and warned, for the client."""

    output: dict[str, str] = field(default_factory=dict)
    warned: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def _captured(into: _Captured) -> Iterator[None]:
    """The calls' stdout, stderr and warnings, kept for the result envelope as well."""
    out, err = _Tail(sys.stdout), _Tail(sys.stderr)
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        warnings.catch_warnings(record=True) as caught,
    ):
        try:
            yield
        finally:
            into.output = {"stdout": out.text(), "stderr": err.text()}
            into.warned = [warning_record(w) for w in caught[:MAX_WARNINGS]]


def _run(
    envelope: TaskEnvelope,
    cache: ObjectCache,
    out: TextIO,
    fetch: Callable[[str], bytes] | None = None,
    captured: _Captured | None = None,
) -> tuple[Any, BaseException | None, dict[str, float]]:
    captured = captured if captured is not None else _Captured()
    timings: dict[str, float] = {}
    try:
        check_versions(envelope.client)
        # On the default path the node runs the environment bootstrap.py installed: every
        # pinned distribution must be at the client's version before user code unpickles.
        installed = current_environment()
        if installed is not None:
            check_pins(installed.versions)
    except PayloadError as e:
        _log(out, f"version mismatch, reporting it to the client: {e}")
        return None, e, timings
    start = time.perf_counter()
    objects = _fetch_objects(envelope, cache, fetch)
    timings["download"] = time.perf_counter() - start
    if objects:
        _log(
            out,
            f"{len(objects)} shared objects, {sum(map(len, objects.values()))} bytes "
            f"({cache.downloads} downloaded, {cache.hits} from the node cache {cache.directory})",
        )
    start = time.perf_counter()
    try:
        calls = load_calls(envelope, objects.__getitem__)
    except Exception as e:
        if isinstance(e, ImportError):
            _add_note(
                e,
                "The node lacks a module that the task needs. On the default path (no "
                "image=), add its distribution with BatchConfig(packages=[...]); with your "
                "own image, pip install it there (see docker/README.md).",
            )
        _log(out, f"the calls could not be unpickled: {type(e).__name__}: {e}")
        return None, e, timings
    finally:
        del objects
        timings["load"] = time.perf_counter() - start
    start = time.perf_counter()
    try:
        with _captured(captured):
            value = calls()
    except BaseException as e:
        # sys.exit() or KeyboardInterrupt raised by the function is its result too: the
        # caller re-raises it, as joblib's own backends do. Batch stops a task with SIGTERM
        # or SIGKILL, never SIGINT, so this cannot swallow a real interruption of the node.
        timings["run"] = time.perf_counter() - start
        _log(out, f"the function raised {type(e).__name__} after {timings['run']:.3f} s")
        _hint_relative_path(e)
        return None, e, timings
    timings["run"] = time.perf_counter() - start
    _log(out, f"ran the calls in {timings['run']:.3f} s")
    return value, None, timings


def main(
    environ: Mapping[str, str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the task described by the environment; returns the process exit code."""
    environ = os.environ if environ is None else environ
    # Line by line into stdout.txt and stderr.txt: what a call printed is there even if
    # it ends the process abruptly, and `joblib-azurebatch logs` shows it while it runs.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    attempt = new_attempt(environ.get(NODE_ID_ENV, ""))
    try:
        blobs = _read_environment(environ)
        try:
            return _run_task(blobs, environ, attempt, out)
        finally:
            blobs.close()
    except _InfrastructureError as e:
        print(f"{_PREFIX} error: {e}", file=err, flush=True)
        return e.code


#: The end of what the calls print that travels back with the result (per stream).
OUTPUT_TAIL_CHARS = 64 * 1024
#: Warnings raised by the calls that travel back with the result, at most.
MAX_WARNINGS = 100


def _run_task(
    blobs: _TaskBlobs, environ: Mapping[str, str], attempt: Mapping[str, str], out: TextIO
) -> int:
    """Download and verify the payload, run it, upload the result; `_InfrastructureError`
    when something outside the user's code fails."""
    key = blobs.key()
    blobs.check_fresh()
    _log(out, f"downloading the payload {blobs.payload_location}")
    start = time.perf_counter()
    try:
        data = blobs.read_payload()
    except (AzureBatchError, OSError) as e:
        raise _InfrastructureError(
            EXIT_DOWNLOAD_FAILED, f"downloading the payload failed: {e}"
        ) from e
    elapsed = time.perf_counter() - start
    try:
        envelope = decode_task(data, key)
    except PayloadError as e:
        raise _InfrastructureError(EXIT_UNVERIFIED, str(e)) from e
    try:
        check_task_binding(envelope, job_id=environ[JOB_ID_ENV], task_id=environ[TASK_ID_ENV])
    except PayloadError as e:
        raise _InfrastructureError(EXIT_WRONG_TASK, str(e)) from e
    _log(
        out,
        f"task {envelope.task_id} of job {envelope.job_id}: {len(data)} bytes in "
        f"{elapsed:.3f} s, signature verified",
    )
    cache = ObjectCache.for_node(environ)
    pruned = cache.prune()
    if pruned:
        _log(out, f"removed {pruned} objects unused for a week from the node cache")
    captured = _Captured()
    context = TaskContext(
        job_id=envelope.job_id,
        task_id=envelope.task_id,
        signing_key=key,
        read=blobs.read_ref,
        write=blobs.write_ref,
    )
    with task_context(context):
        value, error, timings = _run(envelope, cache, out, blobs.read_object, captured)
    timings["download"] = timings.get("download", 0.0) + elapsed
    result = encode_result(
        output=captured.output,
        warned=captured.warned,
        job_id=envelope.job_id,
        task_id=envelope.task_id,
        key=key,
        attempt=attempt,
        value=value,
        error=error,
        timings=timings,
    )
    start = time.perf_counter()
    try:
        blobs.write_result(result)
    except (AzureBatchError, OSError) as e:
        raise _InfrastructureError(EXIT_UPLOAD_FAILED, f"uploading the result failed: {e}") from e
    _log(out, f"uploaded the result ({len(result)} bytes) in {time.perf_counter() - start:.3f} s")
    return EXIT_OK


def _exit(code: int) -> None:
    """End the process with ``code`` now, whatever threads the user's code left running.

    ``sys.exit`` waits for every non-daemon thread, so a function that started one (a
    forgotten ``ThreadPoolExecutor``, a logging handler's thread) would keep the task, and
    its node slot, busy until Batch's wall-clock limit. The result is uploaded (or the
    failure reported) by then, and the streams are flushed here.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())

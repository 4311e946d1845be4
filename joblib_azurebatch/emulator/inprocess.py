"""The joblib worker run inside the emulator's process, for simulated execution.

With ``execution="simulated"`` no task gets a process: it holds its slots for the task
duration, and its calls run here, in a thread of the emulator, with the task's environment
handed over as a mapping. The client then reads the result blob as it reads one that a
node wrote. Two ways to run the worker:

``inline`` (the default)
    The worker's steps made of the public functions of :mod:`joblib_azurebatch.payload`
    and :mod:`joblib_azurebatch.storage`, in the worker's order and with its exit codes:
    read the environment, refuse expired URLs, download and verify the payload
    (`decode_task`), check it is this task's (`check_task_binding`), check the client's
    versions, fetch the shared objects through the node's object cache, unpickle and run
    the calls (`load_calls`), upload the signed result (`encode_result`). Safe to run from
    many threads at once. What the calls print is not captured into the result (the
    worker's capture swaps ``sys.stdout`` for the whole process), and warnings are not
    carried back.

``main``
    :func:`joblib_azurebatch.worker.main` itself, given the environment mapping and
    in-memory streams: exactly the worker, output capture included. That capture uses
    ``contextlib.redirect_stdout`` and ``warnings.catch_warnings``, which change the whole
    process, so calls run one at a time.

Tasks that name a managed identity (node-identity mode) need the node's metadata endpoint
through the process environment, which an in-process run cannot give them: they end with
the worker's "bad environment" exit code and a line in stderr saying so.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from joblib_azurebatch import worker
from joblib_azurebatch.environment import check_pins, current_environment
from joblib_azurebatch.errors import AzureBatchError, CredentialError, PayloadError
from joblib_azurebatch.payload import (
    CONTAINER_URL_ENV,
    NODE_IDENTITY_ENV,
    PAYLOAD_URL_ENV,
    RESULT_URL_ENV,
    SIGNING_KEY_ENV,
    check_task_binding,
    check_versions,
    decode_task,
    encode_result,
    load_calls,
    new_attempt,
)
from joblib_azurebatch.storage import download_url, upload_url

__all__ = ["MODES", "Outcome", "is_worker_task", "run_worker"]

#: The ways :func:`run_worker` runs a task.
MODES = ("inline", "main")

#: ``worker.main`` changes process-wide state (``sys.stdout``, the warnings filters).
_MAIN_LOCK = threading.Lock()


@dataclass(frozen=True)
class Outcome:
    """How an in-process run ended: the exit code a process would have had, and what it
    wrote to its stdout and stderr."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""


class _Failed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def is_worker_task(environ: Mapping[str, str]) -> bool:
    """Whether a task's environment is that of a joblib worker task (its payload named)."""
    return bool(environ.get(PAYLOAD_URL_ENV) or environ.get(CONTAINER_URL_ENV))


def run_worker(environ: Mapping[str, str], *, mode: str = "inline") -> Outcome:
    """Run one worker task described by ``environ``; never raises for the task's sake."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if environ.get(NODE_IDENTITY_ENV):
        return Outcome(
            worker.EXIT_BAD_ENVIRONMENT,
            stderr="[joblib-azurebatch worker] error: simulated execution runs the worker in "
            "the emulator's process, which cannot reach a node's metadata endpoint: "
            "node-identity tasks need execution='processes'\n",
        )
    if mode == "main":
        out, err = io.StringIO(), io.StringIO()
        with _MAIN_LOCK:
            code = worker.main(environ, stdout=out, stderr=err)
        return Outcome(code, out.getvalue(), err.getvalue())
    log: list[str] = []
    try:
        _inline(environ, log)
    except _Failed as e:
        return Outcome(e.code, "".join(log), f"[joblib-azurebatch worker] error: {e}\n")
    return Outcome(worker.EXIT_OK, "".join(log))


def _expired(url: str) -> datetime | None:
    expiry = worker.url_expiry(url)
    return expiry if expiry is not None and expiry <= datetime.now(timezone.utc) else None


def _refused(error: AzureBatchError, url: str) -> _Failed | None:
    """The worker's reading of a 403: an expired URL, if its expiry is past."""
    if isinstance(error, CredentialError) and error.status_code == 403:
        expiry = _expired(url)
        if expiry is not None:
            return _expired_failure(expiry)
    return None


def _expired_failure(expiry: datetime) -> _Failed:
    return _Failed(
        worker.EXIT_URLS_EXPIRED,
        f"the task's URLs expired at {expiry:%Y-%m-%dT%H:%M:%SZ}; it must be prepared again "
        "with fresh URLs",
    )


def _inline(environ: Mapping[str, str], log: list[str]) -> None:
    """The worker's ``_run_task`` for SAS-URL tasks, step by step (see the module doc)."""
    names = (PAYLOAD_URL_ENV, RESULT_URL_ENV, SIGNING_KEY_ENV, worker.JOB_ID_ENV)
    missing = [n for n in (*names, worker.TASK_ID_ENV) if not environ.get(n)]
    if missing:
        raise _Failed(worker.EXIT_BAD_ENVIRONMENT, f"the task's environment lacks {missing}")
    payload_url, result_url = environ[PAYLOAD_URL_ENV], environ[RESULT_URL_ENV]
    try:
        key = bytes.fromhex(environ[SIGNING_KEY_ENV])
    except ValueError:
        raise _Failed(worker.EXIT_BAD_ENVIRONMENT, f"{SIGNING_KEY_ENV} is not hex") from None
    attempt = new_attempt(environ.get(worker.NODE_ID_ENV, ""))
    for url in (payload_url, result_url):
        expiry = _expired(url)
        if expiry is not None:
            raise _expired_failure(expiry)
    start = time.perf_counter()
    try:
        data = download_url(payload_url)
    except (AzureBatchError, OSError) as e:
        refused = _refused(e, payload_url) if isinstance(e, AzureBatchError) else None
        raise refused or _Failed(
            worker.EXIT_DOWNLOAD_FAILED, f"downloading the payload failed: {e}"
        ) from e
    timings = {"download": time.perf_counter() - start}
    try:
        envelope = decode_task(data, key)
    except PayloadError as e:
        raise _Failed(worker.EXIT_UNVERIFIED, str(e)) from e
    job_id, task_id = environ[worker.JOB_ID_ENV], environ[worker.TASK_ID_ENV]
    try:
        check_task_binding(envelope, job_id=job_id, task_id=task_id)
    except PayloadError as e:
        raise _Failed(worker.EXIT_WRONG_TASK, str(e)) from e
    log.append(f"task {task_id} of job {job_id}: {len(data)} bytes, signature verified\n")
    value: Any = None
    error: BaseException | None = None
    try:
        check_versions(envelope.client)
        installed = current_environment()
        if installed is not None:
            check_pins(installed.versions)
    except PayloadError as e:
        error = e
    if error is None:
        cache = worker.ObjectCache.for_node(environ)
        try:
            objects = {sha: cache.get(sha, url) for sha, url in envelope.objects.items()}
        except (AzureBatchError, OSError) as e:
            raise _Failed(worker.EXIT_OBJECT_FAILED, f"fetching a shared object failed: {e}") from e
        start = time.perf_counter()
        try:
            calls = load_calls(envelope, objects.__getitem__)
        except Exception as e:
            error = e
        timings["load"] = time.perf_counter() - start
        del objects
        if error is None:
            start = time.perf_counter()
            try:
                value = calls()
            except BaseException as e:  # the function's exception is its result
                error = e
            timings["run"] = time.perf_counter() - start
    result = encode_result(
        job_id=envelope.job_id,
        task_id=envelope.task_id,
        key=key,
        attempt=attempt,
        value=value,
        error=error,
        timings=timings,
        output={"stdout": "", "stderr": ""},
    )
    try:
        upload_url(result_url, result)
    except (AzureBatchError, OSError) as e:
        refused = _refused(e, result_url) if isinstance(e, AzureBatchError) else None
        raise refused or _Failed(
            worker.EXIT_UPLOAD_FAILED, f"uploading the result failed: {e}"
        ) from e
    log.append(f"uploaded the result ({len(result)} bytes)\n")

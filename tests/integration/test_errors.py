"""Errors as users expect them: the user's own exceptions, infrastructure failures, and bad
configuration caught before anything is created in Batch."""

from __future__ import annotations

import base64
import os
import secrets
import sys
import threading

import cloudpickle
import joblib
import pytest
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch import CredentialError, PayloadError, TaskFailedError
from joblib_azurebatch.payload import RemoteTraceback

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CREATING = ("Pools_CreatePool", "Jobs_CreateJob", "Tasks_CreateTaskCollection")


class DataProblem(ValueError):
    pass


def fail_on_three(x):
    if x == 3:
        raise DataProblem(f"row {x} is malformed")
    return x


def die_hard(x):
    sys.stderr.write(f"worker is about to die on {x}\n")
    sys.stderr.flush()
    os._exit(3)


def square(x):
    return x * x


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


@pytest.fixture
def cfg(local, request):
    name = unique(request.node.name.replace("_", "-")[5:25].strip("-"))
    return local.config(pool_id=name, job_id=name)


def creations(local) -> dict[str, int]:
    return {op: local.emulator.counters[op] for op in CREATING}


def test_user_exception_keeps_its_type_message_and_remote_traceback(cfg):
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(DataProblem, match="row 3 is malformed") as info,
    ):
        Parallel(n_jobs=-1, batch_size=1)(delayed(fail_on_three)(x) for x in range(6))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail_on_three" in cause.tb
    assert "DataProblem: row 3 is malformed" in cause.tb


def test_infrastructure_failure_names_job_task_and_shows_stderr(cfg, batch_client):
    cfg = cfg.replace(max_task_retries=1, keep_job=True)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(TaskFailedError) as info,
    ):
        Parallel(n_jobs=2)(delayed(die_hard)(x) for x in range(2))
    error = info.value
    assert error.job_id.startswith(cfg.job_id + "-")
    assert error.task_id.startswith("task-")
    assert error.task_id in str(error)
    assert error.job_id in str(error)
    assert "exit code 3" in str(error)
    assert "2 attempts" in str(error)  # one try and the one retry Batch was allowed
    assert "worker is about to die on" in error.stderr_tail
    assert "worker is about to die on" in str(error)
    batch_client.begin_delete_job(error.job_id, polling_interval=1).result()


def test_unpicklable_function_fails_before_anything_is_created(local, cfg):
    lock = threading.Lock()

    def holds_a_lock(x):
        with lock:
            return x

    before = creations(local)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(PayloadError, match="holds_a_lock"),
    ):
        Parallel(n_jobs=2)(delayed(holds_a_lock)(x) for x in range(4))
    assert creations(local) == before


def test_wrong_batch_key_is_a_credential_error_before_anything_is_created(local, cfg):
    wrong = base64.b64encode(secrets.token_bytes(64)).decode()
    cfg = cfg.replace(batch_key=wrong)
    before = creations(local)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(CredentialError, match="BATCH_ACCOUNT_KEY") as info,
    ):
        Parallel(n_jobs=2)(delayed(square)(x) for x in range(4))
    assert wrong not in str(info.value)
    assert creations(local) == before


def test_wrong_storage_key_is_a_credential_error_before_any_batch_object(local, cfg):
    wrong = base64.b64encode(secrets.token_bytes(64)).decode()
    cfg = cfg.replace(storage_key=wrong, storage_connection_string=None)
    before = creations(local)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(CredentialError) as info,
    ):
        Parallel(n_jobs=2)(delayed(square)(x) for x in range(4))
    assert wrong not in str(info.value)
    assert creations(local) == before


def test_token_credential_over_http_is_refused_with_the_fix(local, cfg):
    class Token:
        def get_token(self, *scopes, **kwargs):
            raise AssertionError("no token may be requested over http")

    cfg = cfg.replace(batch_key=None, batch_credential=Token())
    seen = len(local.emulator.requests())
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(CredentialError, match="https"),
    ):
        Parallel(n_jobs=2)(delayed(square)(x) for x in range(2))
    # Other tests' pools may still be deleting in the background on the shared account:
    # what matters is that this config sent nothing at all (no request was even signed).
    during = local.emulator.requests()[seen:]
    assert [r for r in during if r.auth != "SharedKey"] == []
    assert [r for r in during if cfg.pool_id in r.path or cfg.job_id in r.path] == []

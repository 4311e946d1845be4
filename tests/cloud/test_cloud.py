"""The backend against a real Azure Batch account and storage account (opt-in).

What the emulator cannot prove: that the real service accepts what the backend sends
(pool with a container configuration, spot nodes, tasks in the worker image), that the
worker image pulls and runs on a node, that SAS URLs signed here open blobs there, and that
a run leaves no job and no blob behind. Skipped unless switched on (see conftest.py and
docs/cloud-tests.md).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from datetime import timedelta
from typing import Any

import cloudpickle
import joblib
import pytest
from joblib import Parallel, delayed
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_val_score

from joblib_azurebatch import BatchConfig
from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.payload import PAYLOAD_URL_ENV, RESULT_URL_ENV, SIGNING_KEY_ENV, versions
from joblib_azurebatch.storage import BlobStore, download_url

# This module is not in the worker image: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# A new spot pool can take several minutes to get its node; the default 300 s is too short.
pytestmark = [pytest.mark.cloud, pytest.mark.timeout(2400)]


def on_the_node(x: int) -> dict[str, Any]:
    """A small computation and what the node says about where it ran."""
    return {
        "value": x * x,
        "node": os.environ.get("AZ_BATCH_NODE_ID", ""),
        "pool": os.environ.get("AZ_BATCH_POOL_ID", ""),
        "python": platform.python_version(),
        "variables": sorted(os.environ),
        "value_hashes": sorted(hashlib.sha256(v.encode()).hexdigest() for v in os.environ.values()),
    }


#: Where an account credential would be, were it (wrongly) handed to a node.
CREDENTIAL_VARIABLES = {
    *(
        v
        for name in ("batch_key", "storage_key", "storage_connection_string")
        for v in BatchConfig.ENV_VARS[name]
    ),
    "AZURE_CLIENT_SECRET",
}


def jobs_of(service: BatchService, cfg: BatchConfig) -> list[str]:
    """The Batch jobs (any state, deleting included) that runs of this config created."""
    return [j.job_id for j in service.list_jobs() if j.job_id.startswith(f"{cfg.job_id}-")]


def assert_no_job_or_blob_left(service: BatchService, store: BlobStore, cfg: BatchConfig) -> None:
    """Blobs go at once; a deleted job may stay listed while the service deletes it."""
    assert store.list_names(f"jobs/{cfg.job_id}-") == []
    deadline = time.monotonic() + 300
    while jobs_of(service, cfg) and time.monotonic() < deadline:
        time.sleep(5)
    assert jobs_of(service, cfg) == []


def test_from_env_reaches_both_accounts(
    base_config: BatchConfig, batch_service: BatchService, blob_store: BlobStore
) -> None:
    cfg = base_config
    assert cfg.batch_url is not None
    assert cfg.batch_url.startswith("https://")
    assert cfg.image == os.environ["JOBLIB_AZUREBATCH_IMAGE"].strip().strip("\"'")
    for secret in (cfg.batch_key, cfg.storage_key, cfg.storage_connection_string):
        if secret:
            assert secret not in repr(cfg)
    # The Batch credential is accepted (a refused one raises CredentialError).
    assert isinstance(batch_service.list_pools(), list)
    # The storage credential writes, and a read SAS signed here opens the blob, as on a node.
    blob_store.ensure_container()
    name = f"cloud-tests/probe-{os.getpid()}-{time.time_ns()}"
    try:
        blob_store.upload(name, b"probe")
        url = blob_store.sas_url(name, read=True, expiry=timedelta(minutes=10))
        assert download_url(url) == b"probe"
    finally:
        blob_store.delete_prefix(name)
    assert not blob_store.exists(name)


def test_parallel_runs_on_the_pool_and_cleans_up(
    cloud_config: BatchConfig, batch_service: BatchService, blob_store: BlobStore
) -> None:
    with joblib.parallel_config(backend="azurebatch", config=cloud_config):
        out = Parallel(n_jobs=-1)(delayed(on_the_node)(x) for x in range(12))

    assert [r["value"] for r in out] == [x * x for x in range(12)]
    assert all(r["node"] for r in out), "a call ran outside a Batch node"
    assert {r["pool"] for r in out} == {cloud_config.pool_id}
    assert {r["python"].rsplit(".", 1)[0] for r in out} == {versions()["python"]}
    # No account credential reaches a node: only the task's SAS URLs and the job's key.
    variables = {name for r in out for name in r["variables"]}
    assert variables & CREDENTIAL_VARIABLES == set()
    assert {v for v in variables if v.startswith("JOBLIB_AZUREBATCH_")} == {
        PAYLOAD_URL_ENV,
        RESULT_URL_ENV,
        SIGNING_KEY_ENV,
    }
    hashes = {h for r in out for h in r["value_hashes"]}
    for secret in (cloud_config.batch_key, cloud_config.storage_key):
        if secret:
            assert hashlib.sha256(secret.encode()).hexdigest() not in hashes
    assert_no_job_or_blob_left(batch_service, blob_store, cloud_config)
    # The shared pool stays for the next test (keep_pool=True); the session deletes it.
    assert batch_service.get_pool(cloud_config.pool_id) is not None


def test_cross_val_score_matches_n_jobs_1(
    cloud_config: BatchConfig, batch_service: BatchService, blob_store: BlobStore
) -> None:
    X, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500)
    cv = KFold(5, shuffle=True, random_state=0)
    expected = cross_val_score(model, X, y, cv=cv, n_jobs=1)
    with joblib.parallel_config(backend="azurebatch", config=cloud_config):
        scores = cross_val_score(model, X, y, cv=cv, n_jobs=-1, error_score="raise")
    assert list(scores) == list(expected)
    assert 0.85 < expected.mean() <= 1.0
    assert_no_job_or_blob_left(batch_service, blob_store, cloud_config)


def test_user_exception_comes_back_and_the_job_is_cleaned_up(
    cloud_config: BatchConfig, batch_service: BatchService, blob_store: BlobStore
) -> None:
    def fails_on_two(x: int) -> int:
        if x == 2:
            raise KeyError(f"no row {x}")
        return x

    with (
        joblib.parallel_config(backend="azurebatch", config=cloud_config),
        pytest.raises(KeyError, match="no row 2") as info,
    ):
        Parallel(n_jobs=-1, batch_size=1)(delayed(fails_on_two)(x) for x in range(4))
    assert "fails_on_two" in str(info.value.__cause__)
    assert_no_job_or_blob_left(batch_service, blob_store, cloud_config)

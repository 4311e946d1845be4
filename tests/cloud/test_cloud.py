"""The backend against a real Azure Batch account and storage account (opt-in).

What the emulator cannot prove: that the real service accepts what the backend sends
(pool with a container configuration, spot nodes, tasks in the worker image), that the
worker image pulls and runs on a node, that SAS URLs signed here open blobs there, and that
a run leaves no job and no blob behind. And, for the default path a first user takes (no
image): that the public python:X.Y-slim image pulls, that the pool's start task installs the
client's environment in its container where the tasks' containers see it, and that the pool
is gone afterwards. Skipped unless switched on (see conftest.py and docs/cloud-tests.md).
"""

from __future__ import annotations

import hashlib
import os
import platform
import secrets
import sys
import time
from datetime import timedelta
from typing import Any

import cloudpickle
import joblib
import pytest
import sklearn
from joblib import Parallel, delayed
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, cross_val_score
from sklearn.tree import DecisionTreeClassifier

from joblib_azurebatch import BatchConfig
from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.bootstrap import BUNDLE_ENV, ENV_ID_ENV
from joblib_azurebatch.payload import PAYLOAD_URL_ENV, RESULT_URL_ENV, SIGNING_KEY_ENV, versions
from joblib_azurebatch.provision import ENVS_PREFIX
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
    # The image is optional: without one the shared pool takes the default path too.
    image = os.environ.get("JOBLIB_AZUREBATCH_IMAGE", "").strip().strip("\"'") or None
    assert cfg.image == image
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


# ---------------------------------------------------------------------- the default path

#: The variables that shape the session's shared pool of the worker image, or keep what a
#: run creates: the first-run test leaves them out, as a first user has none of them set.
#: The others (VM size, container, a base image mirror, timeouts, ...) still apply.
_SHARED_POOL_FIELDS = (
    "image",
    "registry_server",
    "registry_username",
    "registry_password",
    "pool_id",
    "dedicated_nodes",
    "spot_nodes",
    "task_slots_per_node",
    "keep_pool",
    "keep_job",
    "keep_blobs",
    "job_id",
)


def first_run_environ() -> dict[str, str]:
    """The environment without the settings of the shared pool (see _SHARED_POOL_FIELDS)."""
    dropped = {v for name in _SHARED_POOL_FIELDS for v in BatchConfig.ENV_VARS[name]}
    return {k: v for k, v in os.environ.items() if k not in dropped}


def first_run_score(seed: int) -> dict[str, Any]:
    """A call as a first user writes it: a scikit-learn fit; and where it ran."""
    X, y = load_iris(return_X_y=True)
    model = DecisionTreeClassifier(random_state=seed, max_depth=1 + seed % 4)
    cv = KFold(3, shuffle=True, random_state=seed)
    return {
        "score": float(cross_val_score(model, X, y, cv=cv).mean()),
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
        "prefix": sys.prefix,
        "env_id": os.environ.get(ENV_ID_ENV, ""),
        "node": os.environ.get("AZ_BATCH_NODE_ID", ""),
        "pool": os.environ.get("AZ_BATCH_POOL_ID", ""),
        "variables": sorted(os.environ),
    }


def test_first_run_without_an_image_installs_the_environment_and_deletes_the_pool(
    batch_service: BatchService, blob_store: BlobStore
) -> None:
    """docs/azure.md's first run: the default config, a pool of its own, no Docker anywhere."""
    pool_id = f"joblib-azurebatch-first-run-{secrets.token_hex(3)}"
    cfg = BatchConfig.from_env(
        environ=first_run_environ(), pool_id=pool_id, dedicated_nodes=1, job_id=pool_id
    )
    if os.environ.get("JOBLIB_AZUREBATCH_CLOUD_ENTRA", "").strip() == "1":
        cfg = cfg.replace(batch_key=None, storage_key=None, storage_connection_string=None)
    cfg = cfg.validate()
    assert cfg.image is None
    assert cfg.installs_environment
    assert batch_service.get_pool(pool_id) is None
    seeds = list(range(6))
    try:
        with joblib.parallel_config(backend="azurebatch", config=cfg):
            remote = Parallel(n_jobs=-1)(delayed(first_run_score)(s) for s in seeds)
    finally:
        # The run deletes the pool it created; should it have failed before that, the test
        # still leaves nothing billing.
        left = batch_service.get_pool(pool_id)
        if left is not None and left.state != "deleting":
            batch_service.delete_pool(pool_id)

    local = [first_run_score(s) for s in seeds]
    assert [r["score"] for r in remote] == [r["score"] for r in local]
    assert {r["sklearn"] for r in remote} == {sklearn.__version__}
    assert {r["python"].rsplit(".", 1)[0] for r in remote} == {versions()["python"]}
    assert all(r["node"] for r in remote), "a call ran outside a Batch node"
    assert {r["pool"] for r in remote} == {pool_id}
    # Every call ran in the environment the start task installed in the node's shared folder.
    (env_id,) = {r["env_id"] for r in remote}
    assert all(r["prefix"].endswith(f"/joblib-azurebatch/envs/{env_id}") for r in remote)
    # No account credential reaches a node: SAS URLs, the job's key and the environment's id.
    variables = {name for r in remote for name in r["variables"]}
    assert variables & CREDENTIAL_VARIABLES == set()
    assert {v for v in variables if v.startswith("JOBLIB_AZUREBATCH_")} == {
        PAYLOAD_URL_ENV,
        RESULT_URL_ENV,
        SIGNING_KEY_ENV,
        BUNDLE_ENV,
        ENV_ID_ENV,
    }
    # The environment stays in the container for the next run; the job and its blobs go.
    assert sorted(blob_store.list_names(f"{ENVS_PREFIX}{env_id}/")) == [
        f"{ENVS_PREFIX}{env_id}/bootstrap.py",
        f"{ENVS_PREFIX}{env_id}/bundle.zip",
    ]
    assert_no_job_or_blob_left(batch_service, blob_store, cfg)
    # The pool this run created is deleted (the service finishes the deletion on its own).
    left = batch_service.get_pool(pool_id)
    assert left is None or left.state == "deleting", f"the pool {pool_id} was not deleted"

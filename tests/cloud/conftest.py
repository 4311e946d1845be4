"""Opt-in tests against a real Azure account: the switch, the shared pool, and the cleanup.

These tests create a real pool (by default one spot node) and cost a little money, so they
run only when ``JOBLIB_AZUREBATCH_CLOUD_TESTS=1`` and the account settings are in the
environment; otherwise each one is reported as skipped, with the variables still to set as
the reason. docs/cloud-tests.md explains how to run them.

A pool takes minutes to get its first node, so the tests share one for the session: their
runs keep it (``keep_pool=True``) and the session deletes it at the end if the session
created it, unless ``JOBLIB_AZUREBATCH_KEEP_POOL=true`` asks to keep it for the next session.
A pool that existed before the session is never deleted.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from joblib_azurebatch import BatchConfig
from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.storage import BlobStore

ENABLE = "JOBLIB_AZUREBATCH_CLOUD_TESTS"
#: Authenticate with DefaultAzureCredential (Entra ID) instead of account keys.
ENTRA = "JOBLIB_AZUREBATCH_CLOUD_ENTRA"
#: The pool the tests share unless JOBLIB_AZUREBATCH_POOL_ID names another one.
DEFAULT_POOL_ID = "joblib-azurebatch-tests"

HERE = Path(__file__).resolve().parent


def _is_set(environ: Mapping[str, str], *names: str) -> bool:
    return any(environ.get(name, "").strip() for name in names)


def missing_settings(environ: Mapping[str, str]) -> list[str]:
    """The environment variables the cloud tests still need, as the user would set them."""
    missing: list[str] = []
    entra = environ.get(ENTRA, "").strip() == "1"
    if not _is_set(environ, "BATCH_ACCOUNT_URL", "AZURE_BATCH_ENDPOINT"):
        missing.append("BATCH_ACCOUNT_URL (https://<account>.<region>.batch.azure.com)")
    if not _is_set(environ, "BATCH_ACCOUNT_NAME", "AZURE_BATCH_ACCOUNT"):
        missing.append("BATCH_ACCOUNT_NAME")
    if not entra and not _is_set(environ, "BATCH_ACCOUNT_KEY", "AZURE_BATCH_ACCESS_KEY"):
        missing.append(f"BATCH_ACCOUNT_KEY (or {ENTRA}=1 to sign in with Entra ID)")
    if entra:
        # A connection string carries a key, which Entra ID mode ignores: name the account.
        if not _is_set(environ, "STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT"):
            missing.append("STORAGE_ACCOUNT_NAME")
    elif not _is_set(environ, "AZURE_STORAGE_CONNECTION_STRING"):
        if not _is_set(environ, "STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT"):
            missing.append("STORAGE_ACCOUNT_NAME (or AZURE_STORAGE_CONNECTION_STRING)")
        if not _is_set(environ, "STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY"):
            missing.append("STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_CONNECTION_STRING)")
    # JOBLIB_AZUREBATCH_IMAGE is optional: without it every test takes the default path
    # (the public python:X.Y-slim image and the client's environment installed on the nodes).
    return missing


def skip_reason(environ: Mapping[str, str]) -> str | None:
    """Why the cloud tests do not run here, naming exactly what to set; None if they run."""
    missing = missing_settings(environ)
    enabled = environ.get(ENABLE, "").strip() == "1"
    if enabled and not missing:
        return None
    wanted = ([] if enabled else [f"{ENABLE}=1"]) + missing
    return (
        f"real-Azure tests are opt-in; to run them set {', '.join(wanted)} "
        "(see docs/cloud-tests.md)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this folder's tests, with the reason, unless they are switched on and set up."""
    reason = skip_reason(os.environ)
    if reason is None:
        return
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.skip(reason=reason))


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def base_config() -> BatchConfig:
    """The account from the environment (BatchConfig.from_env), shaped as a tiny pool.

    By default the pool is one spot node of two slots, ``joblib-azurebatch-tests``; every
    ``JOBLIB_AZUREBATCH_*`` variable that is set (``POOL_ID``, ``VM_SIZE``,
    ``DEDICATED_NODES``, ``SPOT_NODES``, ``TASK_SLOTS_PER_NODE``, ...) wins over that.
    """
    shape: dict[str, Any] = {
        "pool_id": DEFAULT_POOL_ID,
        "dedicated_nodes": 0,
        "spot_nodes": 1,
        "task_slots_per_node": 2,
    }
    overrides = {
        name: value
        for name, value in shape.items()
        if not _is_set(os.environ, *BatchConfig.ENV_VARS[name])
    }
    if os.environ.get(ENTRA, "").strip() == "1":
        # Ignore keys that happen to be set: the run signs in with DefaultAzureCredential.
        cfg = BatchConfig.from_env(**overrides)
        cfg = cfg.replace(batch_key=None, storage_key=None, storage_connection_string=None)
        return cfg.validate()
    return BatchConfig.from_env(**overrides).validate()


@pytest.fixture(scope="session")
def batch_service(base_config: BatchConfig) -> Iterator[BatchService]:
    service = BatchService.from_config(base_config)
    yield service
    service.close()


@pytest.fixture(scope="session")
def blob_store(base_config: BatchConfig) -> Iterator[BlobStore]:
    with BlobStore.from_config(base_config) as store:
        yield store


@pytest.fixture(scope="session")
def shared_pool(base_config: BatchConfig, batch_service: BatchService) -> Iterator[str]:
    """The pool id the tests run on; deleted at the end if this session created it.

    The runs themselves create it (through the backend) on first use.
    """
    pool_id = base_config.pool_id
    existed = batch_service.get_pool(pool_id) is not None
    yield pool_id
    if existed or base_config.keep_pool:
        return
    batch_service.delete_pool(pool_id)
    left = batch_service.get_pool(pool_id)
    assert left is None or left.state == "deleting", f"the pool {pool_id} was not deleted"


@pytest.fixture
def cloud_config(
    base_config: BatchConfig, shared_pool: str, request: pytest.FixtureRequest
) -> BatchConfig:
    """A config for one test: the shared pool (kept between runs), a job id of its own."""
    name = request.node.name.replace("_", "-")[5:30].strip("-")
    return base_config.replace(
        pool_id=shared_pool, keep_pool=True, job_id=f"cloud-{name}-{secrets.token_hex(3)}"
    )

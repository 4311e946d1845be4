"""The Entra ID path end to end: token credentials only, no account key anywhere.

DESIGN.md promises that ``DefaultAzureCredential`` works where account keys are disabled.
Here the whole local account runs as such an account would be reached: the Batch emulator
and Azurite on https (one self-signed certificate) and both accepting Entra ID bearer
tokens, and a `BatchConfig` with ``batch_credential=`` and ``storage_credential=`` and no
key or connection string. Blobs are then signed with a user delegation key, and the nodes
get SAS URLs only. The client trusts the local certificate through ``ca_bundle=`` (or, in
one test, ``REQUESTS_CA_BUNDLE``), never through a change to the process's environment
that outlives a test.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cloudpickle
import joblib
import pytest
from azure.batch import BatchClient
from azure.core.credentials import AzureNamedKeyCredential
from azure.storage.blob import BlobServiceClient
from joblib import Parallel, delayed

import joblib_azurebatch  # noqa: F401  (registers the "azurebatch" backend)
from joblib_azurebatch.batch import BatchService
from joblib_azurebatch.config import DEFAULT_IMAGE, BatchConfig
from joblib_azurebatch.emulator import LocalBatch
from joblib_azurebatch.emulator.azurite import Azurite
from joblib_azurebatch.errors import ConfigError
from joblib_azurebatch.storage import BlobStore

# The worker runs in another process that cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BATCH_SCOPE = "https://batch.core.windows.net//.default"
STORAGE_SCOPE = "https://storage.azure.com/.default"


class RowError(LookupError):
    """A user exception that must come back as itself, not as a generic failure."""


def square_and_environment(x: int) -> tuple[int, dict[str, str]]:
    """Runs on a node: the result and the task's own environment, as the node sees it."""
    return x * x, dict(os.environ)


def fail_on_two(x: int) -> int:
    if x == 2:
        raise RowError(f"row {x} is missing")
    return x


class RecordingCredential:
    """The local account's token credential, remembering which scopes were asked for."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        self.scopes.extend(scopes)
        return self._inner.get_token(*scopes, **kwargs)


@pytest.fixture(scope="module")
def entra() -> Iterator[LocalBatch]:
    """A local account on https whose Batch and blob endpoints both take Entra ID tokens."""
    with LocalBatch(tls=True, nodes=1, slots_per_node=2) as running:
        yield running


@pytest.fixture
def no_trust_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in the environment trusts the local certificate: only ``ca_bundle`` can."""
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(variable, raising=False)


def _cert(local: LocalBatch) -> str:
    assert local.batch_ca_cert is not None
    return local.batch_ca_cert


def _token_config(
    local: LocalBatch,
    credential: Any,
    name: str,
    *,
    ca_bundle: bool = True,
    image: str | None = DEFAULT_IMAGE,
) -> BatchConfig:
    # Built from nothing but endpoints and the credential: the local account's keys and
    # connection string are not passed, so no code path can fall back to them. Most tests
    # name the worker image (the nodes hold everything); one takes the default path, where
    # the start task fetches the environment through user delegation SAS URLs over https.
    return BatchConfig(
        image=image,
        batch_url=local.batch_url,
        storage_url=local.blob_url,
        storage_account=local.storage_account,
        batch_credential=credential,
        storage_credential=credential,
        ca_bundle=_cert(local) if ca_bundle else None,
        pool_id=name,
        job_id=name,
        container=f"entra-{secrets.token_hex(4)}",
        dedicated_nodes=local.nodes,
        task_slots_per_node=local.slots_per_node,
        poll_interval=0.2,
        pool_linger=0.0,  # the module's account stops after it: no pool kept for later
    )


def _batch(local: LocalBatch, credential: Any) -> BatchClient:
    """The test's own look at the account, with a token as well."""
    return BatchClient(local.batch_url, credential, connection_verify=_cert(local))


def _jobs_left(client: BatchClient, prefix: str) -> list[str]:
    """The run's jobs still listed once their deletion (which Batch does lazily) is over."""
    deadline = time.monotonic() + 10
    while True:
        jobs = [j for j in client.list_jobs() if j.id.startswith(prefix + "-")]
        # A job the run left behind is active; only a job being deleted may still be listed.
        if any(str(j.state).lower().endswith("active") for j in jobs):
            return [j.id for j in jobs]
        if not jobs or time.monotonic() > deadline:
            return [j.id for j in jobs]
        time.sleep(0.1)


def _name(tag: str) -> str:
    return f"entra-{tag}-{secrets.token_hex(3)}"


def test_endpoints_are_https_and_keys_are_not_in_the_config(entra: LocalBatch) -> None:
    cfg = _token_config(entra, entra.token_credential(), _name("cfg"))
    assert entra.batch_url.startswith("https://127.0.0.1:")
    assert entra.blob_url.startswith("https://127.0.0.1:")
    assert cfg.batch_key is None
    assert cfg.storage_key is None
    assert cfg.storage_connection_string is None
    assert cfg.validate() is cfg


def test_request_log_tells_shared_key_from_bearer(entra: LocalBatch) -> None:
    """The https account still takes the key; the log says which scheme each request used,
    which is what lets the run below prove that it sent tokens only."""
    entra.emulator.log.clear()
    keyed = _batch(entra, AzureNamedKeyCredential(entra.batch_account, entra.batch_key))
    list(keyed.list_pools())
    list(_batch(entra, entra.token_credential()).list_pools())
    assert [r.auth for r in entra.emulator.requests("Pools_ListPools")] == ["SharedKey", "Bearer"]


def test_azurite_takes_tokens_only_over_https(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only over https"):
        Azurite(oauth=True)
    with pytest.raises(ValueError, match="both cert and key"):
        Azurite(cert=tmp_path / "cert.pem")


def test_parallel_with_token_credentials_only(entra: LocalBatch, no_trust_env: None) -> None:
    credential = RecordingCredential(entra.token_credential())
    name = _name("run")
    cfg = _token_config(entra, credential, name, image=None)
    entra.emulator.log.clear()
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=-1, batch_size=1)(
            delayed(square_and_environment)(x) for x in range(6)
        )
    assert [value for value, _ in out] == [x * x for x in range(6)]

    # Both services were reached with tokens for their own audience.
    assert BATCH_SCOPE in credential.scopes
    assert STORAGE_SCOPE in credential.scopes

    # The Batch service saw bearer tokens only, on every request the run made.
    records = entra.emulator.requests()
    assert records, "the run made no Batch request"
    assert {r.auth for r in records} == {"Bearer"}
    assert [r.operation_id for r in records if r.status in (401, 403)] == []
    assert entra.emulator.counters["Tasks_CreateTaskCollection"] >= 1

    # Every task ran in its own Batch task, and its environment holds SAS URLs, never a key.
    environments = [env for _, env in out]
    task_ids = {env["AZ_BATCH_TASK_ID"] for env in environments}
    assert len(task_ids) == 6
    secrets_of_account = {entra.batch_key, entra.storage_key}
    for env in environments:
        for variable in ("JOBLIB_AZUREBATCH_PAYLOAD_URL", "JOBLIB_AZUREBATCH_RESULT_URL"):
            url = env[variable]
            parts = urlsplit(url)
            query = parse_qs(parts.query)
            assert parts.scheme == "https"
            assert url.startswith(entra.blob_url + "/" + cfg.container + "/jobs/")
            assert "sig" in query
            assert "skoid" in query  # signed with a user delegation key, not an account key
        assert "r" in parse_qs(urlsplit(env["JOBLIB_AZUREBATCH_PAYLOAD_URL"]).query)["sp"][0]
        assert "r" not in parse_qs(urlsplit(env["JOBLIB_AZUREBATCH_RESULT_URL"]).query)["sp"][0]
        for value in env.values():
            assert not any(key in value for key in secrets_of_account)
            assert "AccountKey" not in value
            assert "Bearer" not in value
            assert "eyJ" not in value

    # The job and the run's blobs are gone.
    client = _batch(entra, credential)
    assert _jobs_left(client, name) == []
    blobs = BlobServiceClient(entra.blob_url, credential=credential, connection_verify=_cert(entra))
    container = blobs.get_container_client(cfg.container)
    assert [b.name for b in container.list_blobs(name_starts_with="jobs/")] == []


def test_task_environment_settings_hold_sas_urls_and_no_key(
    entra: LocalBatch, no_trust_env: None
) -> None:
    credential = entra.token_credential()
    name = _name("env")
    cfg = _token_config(entra, credential, name).replace(keep_job=True, keep_pool=True)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        out = Parallel(n_jobs=-1, batch_size=1)(delayed(fail_on_two)(x) for x in (0, 1, 3))
    assert out == [0, 1, 3]
    client = _batch(entra, credential)
    (job,) = [j for j in client.list_jobs() if j.id.startswith(name + "-")]
    try:
        tasks = list(client.list_tasks(job.id))
        assert len(tasks) == 3
        for task in tasks:
            settings = {s.name: s.value or "" for s in task.environment_settings or []}
            assert set(settings) == {
                "JOBLIB_AZUREBATCH_PAYLOAD_URL",
                "JOBLIB_AZUREBATCH_RESULT_URL",
                "JOBLIB_AZUREBATCH_SIGNING_KEY",
            }
            for variable in ("JOBLIB_AZUREBATCH_PAYLOAD_URL", "JOBLIB_AZUREBATCH_RESULT_URL"):
                query = parse_qs(urlsplit(settings[variable]).query)
                assert "sig" in query
                assert "skoid" in query
            for value in settings.values():
                assert entra.storage_key not in value
                assert entra.batch_key not in value
    finally:
        client.begin_delete_job(job.id, polling_interval=0.2).result()  # type: ignore[arg-type]
        client.begin_delete_pool(name, polling_interval=0.2).result()  # type: ignore[arg-type]


def test_user_exception_comes_back_with_its_type(entra: LocalBatch, no_trust_env: None) -> None:
    credential = entra.token_credential()
    name = _name("err")
    cfg = _token_config(entra, credential, name)
    with (
        joblib.parallel_config(backend="azurebatch", config=cfg),
        pytest.raises(RowError, match="row 2 is missing"),
    ):
        Parallel(n_jobs=-1, batch_size=1)(delayed(fail_on_two)(x) for x in range(4))
    client = _batch(entra, credential)
    assert _jobs_left(client, name) == []
    with BlobStore.from_config(cfg) as store:
        assert store.list_names("jobs/") == []


def test_trust_from_the_environment_without_ca_bundle(
    entra: LocalBatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``ca_bundle`` the SDKs' own setting applies: ``REQUESTS_CA_BUNDLE``."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", _cert(entra))
    cfg = _token_config(entra, entra.token_credential(), _name("envca"), ca_bundle=False)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        assert Parallel(n_jobs=-1)(delayed(fail_on_two)(x) for x in (4, 5)) == [4, 5]


def test_ca_bundle_is_read_from_the_environment_and_checked(tmp_path: Path) -> None:
    bundle = tmp_path / "proxy-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = BatchConfig.from_env(environ={"JOBLIB_AZUREBATCH_CA_BUNDLE": str(bundle)})
    assert cfg.ca_bundle == str(bundle)
    with pytest.raises(ConfigError, match=r"ca_bundle .*JOBLIB_AZUREBATCH_CA_BUNDLE"):
        BatchConfig(ca_bundle=str(tmp_path / "missing.pem"))


# ---------------------------------------------------------------------- DefaultAzureCredential


def test_default_azure_credential_when_no_key_and_no_credential(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a key or a credential both clients get ``DefaultAzureCredential``.

    Building the clients contacts nothing (credentials fetch tokens on the first request),
    so unreachable endpoints are fine here.
    """
    from azure.identity import DefaultAzureCredential

    for variable in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET"):
        monkeypatch.delenv(variable, raising=False)
    cfg = BatchConfig(
        batch_url="https://myaccount.westeurope.batch.azure.com",
        storage_account="mystorage",
    )
    service = BatchService.from_config(cfg)
    try:
        batch_credential = service._client._config.credential
        assert isinstance(batch_credential, DefaultAzureCredential)
        assert service._uses_key is False
    finally:
        service.close()
    with BlobStore.from_config(cfg) as store:
        assert isinstance(store._token_credential, DefaultAzureCredential)
        assert store._account_key is None
        assert store.container_url.startswith("https://mystorage.blob.core.windows.net/")

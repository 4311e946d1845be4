"""BlobStore and the worker-side SAS helpers against Azurite, with the real storage SDK."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from azure.core.credentials import AccessToken
from azure.storage.blob import ContainerClient

from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.emulator.azurite import AZURITE_ACCOUNT_NAME, Azurite, find_azurite
from joblib_azurebatch.errors import ConfigError, CredentialError
from joblib_azurebatch.storage import BlobStore, download_url, redact_url, upload_url
from tests.helpers.accounts import azurite_config

HOUR = timedelta(hours=1)


def test_round_trip_exists_and_missing(store: BlobStore) -> None:
    store.ensure_container()  # a second time is fine
    assert not store.exists("a/b")
    store.upload("a/b", b"hello")
    assert store.exists("a/b")
    assert store.download("a/b") == b"hello"
    store.upload("a/b", b"again")
    assert store.download("a/b") == b"again"
    with pytest.raises(FileExistsError):
        store.upload("a/b", b"third", overwrite=False)
    assert store.download("a/b") == b"again"
    with pytest.raises(FileNotFoundError, match="nope"):
        store.download("nope")


@pytest.mark.parametrize("size", [10, 2 * 1024 * 1024])
def test_upload_if_absent_stores_once_and_counts_bytes(store: BlobStore, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    before = store.bytes_uploaded
    assert store.upload_if_absent("objects/h", data) is True
    assert store.bytes_uploaded - before == len(data)
    assert store.upload_if_absent("objects/h", b"something else") is False
    assert store.upload_if_absent("objects/h", data) is False
    assert store.bytes_uploaded - before == len(data)
    assert store.download("objects/h") == data


def test_concurrent_writers_store_once_and_counter_is_exact(store: BlobStore) -> None:
    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda _: store.upload_if_absent("same", b"z" * 1000), range(16)))
    assert wins.count(True) == 1
    before = store.bytes_uploaded
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.upload(f"many/{i}", b"q" * (i + 1)), range(40)))
    assert store.bytes_uploaded - before == sum(range(1, 41))


def test_list_and_delete_prefix(store: BlobStore) -> None:
    for i in range(5):
        store.upload(f"jobs/j1/tasks/{i}/payload", b"p")
    store.upload("jobs/j10/keep", b"k")
    store.upload("jobs/j2/keep", b"k")
    assert store.list_names("jobs/j1/") == [f"jobs/j1/tasks/{i}/payload" for i in range(5)]
    assert store.delete_prefix("jobs/j1/") == 5
    assert store.list_names("jobs/") == ["jobs/j10/keep", "jobs/j2/keep"]
    assert store.delete_prefix("jobs/j1/") == 0
    with pytest.raises(ValueError, match="non-empty prefix"):
        store.delete_prefix("")


def test_read_sas_reads_but_cannot_write(store: BlobStore) -> None:
    store.upload("jobs/j/payload", b"payload bytes")
    url = store.sas_url("jobs/j/payload", read=True, expiry=HOUR)
    assert download_url(url) == b"payload bytes"
    with pytest.raises(CredentialError) as info:
        upload_url(url, b"overwrite attempt")
    assert "sig=" not in str(info.value)
    assert redact_url(url) in str(info.value)
    assert store.download("jobs/j/payload") == b"payload bytes"


def test_write_sas_writes_but_cannot_read(store: BlobStore) -> None:
    url = store.sas_url("jobs/j/result", write=True, expiry=HOUR)
    upload_url(url, b"result 1")
    upload_url(url, b"result 2")  # a retried task rewrites its result
    assert store.download("jobs/j/result") == b"result 2"
    with pytest.raises(CredentialError):
        download_url(url)
    with pytest.raises(CredentialError):
        download_url(url.replace("jobs/j/result", "jobs/j/other"))  # scoped to one blob


def test_expired_sas_is_refused(store: BlobStore) -> None:
    store.upload("short", b"s")
    url = store.sas_url("short", read=True, expiry=timedelta(seconds=1))
    assert download_url(url) == b"s"
    time.sleep(2.2)
    with pytest.raises(CredentialError, match="expired"):
        download_url(url)


def test_missing_blob_through_sas_is_file_not_found(store: BlobStore) -> None:
    url = store.sas_url("absent", read=True, expiry=HOUR)
    with pytest.raises(FileNotFoundError):
        download_url(url)


def test_sas_needs_a_permission(store: BlobStore) -> None:
    with pytest.raises(ValueError, match="read=True or write=True"):
        store.sas_url("x", expiry=HOUR)


def test_container_sas_lists_and_reads(store: BlobStore) -> None:
    store.upload("out/1", b"one")
    url = store.container_sas_url(read=True, listing=True, expiry=HOUR)
    client = ContainerClient.from_container_url(url)
    assert list(client.list_blob_names(name_starts_with="out/")) == ["out/1"]
    assert client.download_blob("out/1").readall() == b"one"


def test_connection_string_store_signs_sas(azurite: Azurite) -> None:
    cfg = BatchConfig(
        storage_connection_string=azurite.connection_string, container=f"c-{uuid.uuid4().hex[:8]}"
    )
    with BlobStore.from_config(cfg) as store:
        store.ensure_container()
        store.upload("k", b"via connection string")
        url = store.sas_url("k", read=True, expiry=HOUR)
        assert download_url(url) == b"via connection string"


def test_wrong_key_is_a_credential_error_without_the_key(azurite: Azurite) -> None:
    wrong = base64.b64encode(b"definitely-not-the-azurite-key-0123456789").decode()
    with BlobStore.from_config(azurite_config(azurite, storage_key=wrong)) as store:
        with pytest.raises(CredentialError, match="STORAGE_ACCOUNT_KEY") as info:
            store.ensure_container()
        assert wrong not in str(info.value)
        assert info.value.__cause__ is not None  # translated with `raise ... from e`


def test_bytes_uploaded_is_read_safely_while_writing(store: BlobStore) -> None:
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(store.bytes_uploaded)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(10):
            store.upload(f"w/{i}", b"0123456789")
    finally:
        stop.set()
        watcher.join()
    assert seen == sorted(seen)
    assert store.bytes_uploaded >= 100


# ---------------------------------------------------------------------- Entra ID (token) path


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1: token credentials are only sent over https."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def azurite_oauth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Azurite on https with OAuth: it accepts bearer tokens and user delegation keys."""
    folder = tmp_path_factory.mktemp("azurite-oauth")
    cert, key = _self_signed_certificate(folder)
    command = [find_azurite(), "--blobHost", "127.0.0.1", "--blobPort", "0"]
    command += ["--location", str(folder / "data"), "--skipApiVersionCheck", "--loose"]
    command += ["--oauth", "basic", "--cert", str(cert), "--key", str(key)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            match = re.search(r"successfully listens on (https://\S+)", line)
            if match:
                url = match.group(1).rstrip("/")
        assert url is not None, "Azurite with --oauth did not start"
        threading.Thread(target=process.stdout.read, daemon=True).start()  # keep draining
        yield f"{url}/{AZURITE_ACCOUNT_NAME}", cert
    finally:
        # Its data is a temporary folder: nothing to shut down gracefully.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class _EntraToken:
    """A token credential as azure-identity gives one; Azurite checks its claims only."""

    def __init__(self) -> None:
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.scopes.extend(scopes)
        now = int(time.time())
        tenant = "ab1f708d-50f6-404c-a006-d71b2ac7a606"

        def part(data: dict[str, object]) -> str:
            return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

        claims = {
            "aud": "https://storage.azure.com",
            "iss": f"https://sts.windows.net/{tenant}/",
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + 3600,
            "oid": "00000000-0000-0000-0000-0000000000a1",
            "tid": tenant,
        }
        return AccessToken(
            f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2ln", now + 3600
        )


def test_token_credential_signs_user_delegation_sas(
    azurite_oauth: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, cert = azurite_oauth
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # trust the test certificate
    token = _EntraToken()
    cfg = BatchConfig(
        storage_account=AZURITE_ACCOUNT_NAME,
        storage_url=url,
        storage_credential=token,
        container="entra",
    )
    with BlobStore.from_config(cfg) as store:
        store.ensure_container()
        store.upload("jobs/j/payload", b"signed by a delegation key")
        assert "https://storage.azure.com/.default" in token.scopes
        read = store.sas_url("jobs/j/payload", read=True, expiry=HOUR)
        write = store.sas_url("jobs/j/result", write=True, expiry=HOUR)
        assert "skoid=" in read  # a user delegation SAS, not an account-key one
        assert download_url(read) == b"signed by a delegation key"
        upload_url(write, b"result")
        assert store.download("jobs/j/result") == b"result"
        with pytest.raises(CredentialError):
            upload_url(read, b"read-only")
        with pytest.raises(ConfigError, match="at most 7 days"):
            store.sas_url("x", read=True, expiry=timedelta(days=8))

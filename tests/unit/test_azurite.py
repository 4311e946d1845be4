"""The Azurite launcher: it starts on a free port, serves the real SDK, and leaves nothing."""

from __future__ import annotations

import os

import pytest
from azure.storage.blob import BlobServiceClient

from joblib_azurebatch.emulator.azurite import Azurite, AzuriteNotFoundError, find_azurite


def test_serves_the_blob_sdk_and_stops_cleanly() -> None:
    with Azurite() as azurite:
        pid = azurite.pid
        assert pid is not None
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        container = service.create_container("probe")
        container.upload_blob("a/b.bin", b"payload")
        assert container.download_blob("a/b.bin").readall() == b"payload"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_stops_when_the_body_raises() -> None:
    azurite = Azurite()
    with pytest.raises(RuntimeError, match="boom"), azurite:
        pid = azurite.pid
        raise RuntimeError("boom")
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_executable_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("JOBLIB_AZUREBATCH_AZURITE", str(tmp_path / "nowhere"))
    with pytest.raises(AzuriteNotFoundError, match="npm install azurite"):
        find_azurite()

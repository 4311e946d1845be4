"""The Entra ID path: bearer tokens over https, refused when forged or for another audience."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from azure.batch import BatchClient
from azure.batch import models as m
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError

from joblib_azurebatch.emulator import BatchEmulator


@pytest.fixture(scope="module")
def emu() -> Iterator[BatchEmulator]:
    with BatchEmulator(tls=True) as running:
        yield running


class Forged:
    """A credential whose token the emulator never issued."""

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        return AccessToken("forged-token", int(time.time()) + 3600)


def test_token_credential_works_over_https(emu: BatchEmulator) -> None:
    assert emu.url.startswith("https://127.0.0.1:")
    cred = emu.token_credential()
    client = BatchClient(emu.url, cred, connection_verify=str(emu.ca_cert))
    client.create_pool(m.BatchPoolCreateOptions(id="by-token", vm_size="standard_d2s_v3"))
    assert client.get_pool("by-token").id == "by-token"
    assert cred.requests >= 1


def test_forged_token_is_refused_and_changes_nothing(emu: BatchEmulator) -> None:
    forged = BatchClient(emu.url, Forged(), connection_verify=str(emu.ca_cert))
    with pytest.raises(ClientAuthenticationError) as info:
        forged.create_pool(m.BatchPoolCreateOptions(id="forged", vm_size="standard_d2s_v3"))
    assert info.value.status_code == 401
    assert info.value.error.code == "AuthenticationFailed"
    good = BatchClient(emu.url, emu.token_credential(), connection_verify=str(emu.ca_cert))
    assert "forged" not in {p.id for p in good.list_pools()}


def test_token_for_another_resource_is_refused(emu: BatchEmulator) -> None:
    storage_token = BatchClient(
        emu.url,
        emu.token_credential(),
        connection_verify=str(emu.ca_cert),
        credential_scopes=["https://storage.azure.com/.default"],
    )
    with pytest.raises(ClientAuthenticationError):
        list(storage_token.list_pools())


def test_expired_token_is_refused(emu: BatchEmulator) -> None:
    stale = BatchClient(
        emu.url, emu.token_credential(lifetime=-1.0), connection_verify=str(emu.ca_cert)
    )
    with pytest.raises(ClientAuthenticationError):
        list(stale.list_pools())


def test_untrusted_certificate_fails_before_any_request(emu: BatchEmulator) -> None:
    before = len(emu.requests())
    client = BatchClient(emu.url, emu.token_credential(), retry_total=0)
    with pytest.raises(ServiceRequestError):
        list(client.list_pools())
    assert len(emu.requests()) == before

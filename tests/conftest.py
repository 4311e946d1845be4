"""Fixtures shared by the whole suite: the local account's services, started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from joblib_azurebatch.emulator.azurite import Azurite


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """A blob-only Azurite on a free port, for tests that need storage but no Batch emulator."""
    with Azurite() as running:
        yield running

"""Configs for the local services that tests build by hand."""

from __future__ import annotations

import uuid

from joblib_azurebatch.config import BatchConfig
from joblib_azurebatch.emulator.azurite import Azurite


def azurite_config(azurite: Azurite, **changes: object) -> BatchConfig:
    """A config for the session's Azurite with a container of its own (no Batch account)."""
    values: dict[str, object] = {
        "storage_account": azurite.account_name,
        "storage_url": azurite.blob_url,
        "storage_key": azurite.account_key,
        "container": f"t-{uuid.uuid4().hex[:12]}",
    }
    values.update(changes)
    return BatchConfig(**values)  # type: ignore[arg-type]

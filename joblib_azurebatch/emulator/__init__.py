"""A local Azure Batch account: the Batch emulator plus Azurite, for tests, demos and development.

Azure has no Batch emulator, so this package ships one that the real ``azure-batch`` SDK talks
to over HTTP (Shared Key, the 2025-06-01 wire format), with Azurite for blobs::

    from joblib_azurebatch.emulator import LocalBatch

    with LocalBatch(nodes=2, slots_per_node=2) as local:
        cfg = local.config()

Production modules never import this package; it needs the ``[local]`` extra.
"""

from __future__ import annotations

from .localbatch import LocalBatch
from .server import BatchEmulator

__all__ = ["BatchEmulator", "LocalBatch"]

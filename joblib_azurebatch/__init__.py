"""joblib-azurebatch: run joblib and scikit-learn loops on an Azure Batch pool.

Importing the package registers the ``"azurebatch"`` joblib backend::

    import joblib
    from joblib_azurebatch import BatchConfig

    cfg = BatchConfig.from_env(pool_id="cv-pool", spot_nodes=8)
    with joblib.parallel_config(backend="azurebatch", config=cfg):
        scores = cross_val_score(model, X, y, cv=KFold(10), n_jobs=-1)

The backend module and the pool warning (and with them the Azure Batch SDK) are imported
on first use, not here:
the worker that runs on every node imports this package too, and starts faster without it.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

from joblib import register_parallel_backend

from .config import BatchConfig
from .errors import (
    AzureBatchError,
    ConfigError,
    CredentialError,
    PayloadError,
    QuotaError,
    RemoteError,
    RunLostError,
    ServiceError,
    TaskFailedError,
    ThrottledError,
    VersionMismatchError,
)

if TYPE_CHECKING:
    from .backend import AzureBatchBackend
    from .pools import PoolDifferenceWarning
    from .resume import StoredResults

__all__ = [
    "AzureBatchBackend",
    "AzureBatchError",
    "BatchConfig",
    "ConfigError",
    "CredentialError",
    "PayloadError",
    "PoolDifferenceWarning",
    "QuotaError",
    "RemoteError",
    "RunLostError",
    "ServiceError",
    "TaskFailedError",
    "ThrottledError",
    "VersionMismatchError",
    "__version__",
    "register",
    "stored_results",
]

try:
    __version__ = _metadata.version("joblib-azurebatch")
except _metadata.PackageNotFoundError:  # pragma: no cover - a bare checkout
    __version__ = "0.0.0"

#: The name joblib knows the backend by.
BACKEND_NAME = "azurebatch"


def _backend_factory(**kwargs: Any) -> AzureBatchBackend:
    from .backend import AzureBatchBackend

    return AzureBatchBackend(**kwargs)


def register(*, name: str = BACKEND_NAME, make_default: bool = False) -> None:
    """Register the backend with joblib (importing the package already did, as ``"azurebatch"``).

    ``make_default=True`` makes every ``Parallel`` without a backend use Azure Batch.
    """
    register_parallel_backend(name, _backend_factory, make_default=make_default)


def stored_results(job_id: str, config: BatchConfig | None = None) -> StoredResults:
    """The results the tasks of the resumable job ``job_id`` stored, without re-running its
    script (``resume=True``; see docs/resume.md): ``.values`` in call order, with
    ``joblib_azurebatch.resume.MISSING`` where a call has none yet. ``config`` names the
    storage account and container (default: `BatchConfig.from_env`)."""
    import contextlib

    from .resume import stored_results as _stored
    from .storage import BlobStore

    cfg = config if config is not None else BatchConfig.from_env()
    with contextlib.closing(BlobStore.from_config(cfg)) as store:
        return _stored(store, job_id)


def __getattr__(name: str) -> Any:
    if name == "AzureBatchBackend":
        from .backend import AzureBatchBackend

        return AzureBatchBackend
    if name == "PoolDifferenceWarning":
        from .pools import PoolDifferenceWarning

        return PoolDifferenceWarning
    raise AttributeError(f"module 'joblib_azurebatch' has no attribute {name!r}")


register()

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


def __getattr__(name: str) -> Any:
    if name == "AzureBatchBackend":
        from .backend import AzureBatchBackend

        return AzureBatchBackend
    if name == "PoolDifferenceWarning":
        from .pools import PoolDifferenceWarning

        return PoolDifferenceWarning
    raise AttributeError(f"module 'joblib_azurebatch' has no attribute {name!r}")


register()

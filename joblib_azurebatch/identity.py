"""Node-identity mode: the pool's managed identity, not the task, carries the access.

With ``BatchConfig.node_identity`` set, a task's definition names blobs and carries no
capability (no SAS URL, no signing key): the nodes read and write the container as the
pool's user-assigned managed identity, and the job's key travels as a blob only that identity
(and whoever may read the container) can read. See docs/security.md.

The Batch data plane, which the library creates pools with, cannot give a pool an identity:
``BatchPoolCreateOptions`` has no ``identity``, and a pool shows its identities only when read
back. So this mode never creates a pool. The pool must exist already, made through the
management plane (the portal, an ARM or Bicep template, ``azure-mgmt-batch``) with the
identity, and :func:`check_pool` says so before anything is created: a pool created here
would have no identity, and every task on it would fail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .batch import PoolInfo
    from .config import BatchConfig
    from .service import BatchApi

__all__ = ["SETUP_DOC", "check_pool", "has_identity"]

#: Where the steps to create such a pool are written down.
SETUP_DOC = "docs/security.md, section 'Closing it: node identity'"


def has_identity(pool: PoolInfo, identity: str) -> bool:
    """Whether ``pool`` has the user-assigned identity ``identity`` (ARM ids compare
    case-insensitively, as Azure Resource Manager compares them)."""
    wanted = identity.lower()
    return any(found.lower() == wanted for found in pool.identities)


def check_pool(svc: BatchApi, cfg: BatchConfig) -> PoolInfo | None:
    """The run's pool, if the config is in node-identity mode; `ConfigError` unless it
    exists and has the identity.

    Does nothing (and sends no request) without ``cfg.node_identity``. Call it before
    anything is created in Azure: the error then leaves nothing behind.
    """
    identity = cfg.node_identity
    if identity is None:
        return None
    pool = svc.get_pool(cfg.pool_id)
    if pool is None or pool.state == "deleting":
        state = "does not exist" if pool is None else "is being deleted"
        raise ConfigError(
            f"node_identity is set, so the pool {cfg.pool_id} must already exist with the "
            f"managed identity {identity}, and it {state}. The library creates pools through "
            "the Batch data plane, which cannot give a pool an identity: create the pool once "
            "through the management plane (an ARM or Bicep template deployed with `az "
            "deployment group create`, the Azure portal, or azure-mgmt-batch), with "
            f"identity.userAssignedIdentities naming {identity}, then run again. The steps "
            f"and a template are in {SETUP_DOC}. Nothing was created."
        )
    if not has_identity(pool, identity):
        found = ", ".join(pool.identities) or "none"
        raise ConfigError(
            f"The pool {cfg.pool_id} does not have the managed identity {identity} that "
            f"node_identity names (its user-assigned identities: {found}), so its nodes could "
            "not read their tasks. Add the identity to the pool through the management plane "
            "(the template's identity.userAssignedIdentities, or the portal) while the pool has "
            "no nodes, since nodes keep the identities they started with; or set node_identity "
            f"to one of the pool's identities ({SETUP_DOC}). Nothing was created."
        )
    return pool
